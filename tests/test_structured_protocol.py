"""The structured protocol and ``robustlab structured``: spatial, universal and patch threat models each
evaluated as its own threat model into the store. The command end to end (JSON, store rows, report
page, leaderboard groups per threat model), a killed run resumed to identical rows without refitting,
numbers equal to the library evaluation on the same seed, one-line errors with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from robustlab.attacks.patch import AdversarialPatch
from robustlab.attacks.universal import UniversalSGD
from robustlab.cli import main
from robustlab.data import load_dataset
from robustlab.errors import RobustlabError
from robustlab.eval.protocols.structured import (
    StructuredProtocol,
    batch_generator,
    fit_generator,
    parse_threat,
)
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore
from robustlab.eval.structured import (
    evaluate_patch,
    evaluate_spatial,
    evaluate_universal,
)
from robustlab.models import load_model
from robustlab.report.html import write_report
from robustlab.report.leaderboard import leaderboard

SPATIAL = "spatial:angle=20,shift=1,angles=9,shifts=3,steps=5"
UNIVERSAL = "universal:norm=linf,eps=0.15,epochs=3"
PATCH = "patch:size=3,epochs=3,draws=3,stride=2"
THREATS = [SPATIAL, UNIVERSAL, PATCH]
FIT_N = 200


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "6", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(str(checkpoint)).model.eval()


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test").subset(48), load_dataset("digits", "train")


def _protocol(train, threats=THREATS) -> StructuredProtocol:
    return StructuredProtocol([parse_threat(t) for t in threats], (1, 8, 8), (train.x[:FIT_N], train.y[:FIT_N]),
                              f"digits:train[0:{FIT_N}]")


def _rows(store, run_id, task):
    """A task's stored rows without run id, task and seconds."""
    return [tuple(r)[2:-1] for r in store.sample_rows("structured_samples", run_id, task)]


def _cli(checkpoint, db, *extra):
    args = ["structured", "--model", str(checkpoint), "--data", "digits", "--n", "40", "--fit-n", str(FIT_N),
            "--batch-size", "16", "--device", "cpu", "--db", str(db)]
    for t in THREATS:
        args += ["--threat", t]
    return main([*args, *extra])


def test_cli_end_to_end_store_report_and_leaderboard(checkpoint, tmp_path, capsys):
    db = tmp_path / "s.db"
    assert _cli(checkpoint, db, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    names = [parse_threat(t).name for t in THREATS]
    assert list(out["robust_accuracy"]) == names and out["n"] == 40 and out["resumed"] is False
    spatial, universal, patch = (out["threats"][n] for n in names)
    with ResultsStore(db) as store:
        for name in names:
            rows = store.sample_rows("structured_samples", out["run_id"], name)
            assert len(rows) == 40
            t = out["threats"][name]
            # the summary is the rows' numbers
            assert t["robust_accuracy"] == sum(r["robust"] for r in rows) / 40
            assert t["clean_accuracy"] == out["clean_accuracy"] == sum(r["clean_correct"] for r in rows) / 40
            for r in rows:
                assert not r["robust"] or r["clean_correct"]
                assert (r["broken_by"] is not None) == (r["clean_correct"] and not r["robust"])
        srows = store.sample_rows("structured_samples", out["run_id"], names[0])
        urows = store.sample_rows("structured_samples", out["run_id"], names[1])
        prows = store.sample_rows("structured_samples", out["run_id"], names[2])
    for r in srows:  # a broken point keeps the transformation that fooled it, inside the bounds
        if r["broken_by"] is not None:
            assert abs(r["angle"]) <= 20 and abs(r["dx"]) <= 1 and abs(r["dy"]) <= 1 and r["adv_pred"] != r["label"]
        else:
            assert r["angle"] is None
    assert universal["fooling_rate"] == sum(r["fooled"] for r in urows) / 40
    assert all(r["fooled"] == (r["adv_pred"] != r["clean_pred"]) for r in urows)
    assert universal["fit"]["n"] == FIT_N and universal["fit"]["norm"] <= 0.15 + 1e-6
    assert patch["random_position_accuracy"] == sum(r["random_correct"] for r in prows) / (3 * 40)
    assert patch["worst_position_accuracy"] <= patch["random_position_accuracy"]
    for r in prows:
        if r["broken_by"] is not None:
            assert 0 <= r["patch_row"] <= 5 and 0 <= r["patch_col"] <= 5
    assert spatial["robust_accuracy"] < spatial["clean_accuracy"]

    # the report: one section per threat model, every task's rows in samples.csv
    assert main(["report", out["run_id"], "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Structured threat models" in page and all(n in page for n in names)
    assert "fooling rate" in page and "accuracy, worst position" in page and "data:image/png;base64" in page
    lines = (tmp_path / "rep" / "samples.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 40 and lines[0].startswith("task,sample_index,label")

    # the leaderboard: one group per threat model, each titled by it
    with ResultsStore(db, readonly=True) as store:
        groups = leaderboard(store)
    titles = sorted(g.title for g in groups)
    assert titles == ["digits · patch 3x3px", "digits · spatial angle<=20deg shift<=1px",
                      "digits · universal linf eps=0.15"]
    by_title = {g.title: g for g in groups}
    assert by_title["digits · universal linf eps=0.15"].rows[0].robust_accuracy == universal["robust_accuracy"]
    assert by_title["digits · patch 3x3px"].columns[:2] == ("robust_accuracy", "random_position_accuracy")

    # the leaderboard site: one RobustBench-style record per threat model
    assert main(["leaderboard", "--db", str(db), "--site", str(tmp_path / "site"), "--no-reports"]) == 0
    records = sorted(p.parent.name for p in (tmp_path / "site" / "json" / "digits" / "test").glob("*/*.json"))
    assert records == ["patch-3", "spatial-20-1", "universal-linf-0.15"]
    capsys.readouterr()

    # --resume of the finished run gives it back
    assert _cli(checkpoint, db, "--json", "--resume") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["run_id"] == out["run_id"] and again["resumed"] is True


class Crash(Exception):
    pass


def test_killed_run_resumes_to_identical_rows_without_refitting(model, data, tmp_path, monkeypatch):
    test, train = data
    with ResultsStore(tmp_path / "full.db") as store:
        full = run(model, test, _protocol(train), store, batch_size=16, seed=3)
        want = {t: _rows(store, full.run_id, t) for t in full.summary["threats"]}

    crashing = _protocol(train)
    calls = {"n": 0}
    original = crashing.run_batch

    def run_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the spatial task and one universal batch
            raise Crash
        return original(*args, **kwargs)

    crashing.run_batch = run_batch
    db = tmp_path / "resumed.db"
    with ResultsStore(db) as store, pytest.raises(Crash):
        run(model, test, crashing, store, batch_size=16, seed=3)
    with ResultsStore(db) as store:  # the interrupted run's report: partial numbers, said so
        (killed,) = store.list_runs()
        paths = write_report(store, killed["run_id"], tmp_path / "partial")
    assert "INCOMPLETE RUN" in paths["html"].read_text()
    assert len(paths["samples"].read_text().splitlines()) == 1 + 48 + 16  # spatial done, one universal batch

    fits = {"n": 0}
    for cls in (UniversalSGD, AdversarialPatch):
        fit = cls.fit

        def counted(self, *a, _fit=fit, **k):
            fits["n"] += 1
            return _fit(self, *a, **k)

        monkeypatch.setattr(cls, "fit", counted)
    logs = []
    again = _protocol(train)
    batches = {"n": 0}
    original_again = again.run_batch

    def counting(*args, **kwargs):
        batches["n"] += 1
        return original_again(*args, **kwargs)

    again.run_batch = counting
    with ResultsStore(db) as store:
        resumed = run(model, test, again, store, batch_size=16, seed=3, resume=True, log=logs.append)
        got = {t: _rows(store, resumed.run_id, t) for t in resumed.summary["threats"]}
    assert resumed.resumed and fits["n"] == 0  # both fits were kept with the run before the crash
    assert batches["n"] == 9 - 4  # 3 threat models x 3 batches, 4 finished before the crash are not redone
    assert sum("using the" in line for line in logs) == 2
    assert got == want
    strip = lambda s: {k: {kk: vv for kk, vv in v.items() if kk not in ("seconds", "fit")}
                       for k, v in s["threats"].items()}
    assert strip(resumed.summary) == strip(full.summary)


def test_numbers_equal_the_library_evaluation_on_the_same_seed(model, data, tmp_path):
    test, train = data
    n, seed = 48, 5
    specs = [parse_threat(t) for t in THREATS]
    with ResultsStore(tmp_path / "one.db") as store:  # one batch: the library's generators are the run's
        result = run(model, test, _protocol(train), store, batch_size=n, seed=seed)
        robust = {s.name: [r["robust"] for r in store.sample_rows("structured_samples", result.run_id, s.name)]
                  for s in specs}
    x, y = test.x, test.y
    fx, fy = train.x[:FIT_N], train.y[:FIT_N]
    lib_spatial = evaluate_spatial(model, x, y, specs[0].attacks, batch_generator(seed, specs[0].name, 0))
    lib_universal = evaluate_universal(model, specs[1].attacks[0], fx, fy, x, y, fit_generator(seed, specs[1].name))
    lib_patch = evaluate_patch(model, specs[2].attacks[0], fx, fy, x, y, draws=3,
                               generator=fit_generator(seed, specs[2].name),
                               eval_generator=batch_generator(seed, specs[2].name, 0))
    s = result.summary["threats"]
    same = lambda a, b: a == pytest.approx(b, abs=1e-7)  # the library means are float32
    assert same(s[specs[0].name]["robust_accuracy"], lib_spatial.robust_accuracy["worst case"])
    assert same(s[specs[1].name]["robust_accuracy"], lib_universal.robust_accuracy["universal"])
    assert same(s[specs[1].name]["fooling_rate"], lib_universal.extras["fooling_rate"])
    assert same(s[specs[2].name]["random_position_accuracy"], lib_patch.robust_accuracy["random position"])
    assert same(s[specs[2].name]["worst_position_accuracy"], lib_patch.robust_accuracy["worst position"])
    for spec, lib in zip(specs, (lib_spatial, lib_universal, lib_patch)):
        assert robust[spec.name] == [int(v) for v in lib.robust]  # the same points, not only the same count
        assert same(s[spec.name]["clean_accuracy"], lib.clean_accuracy)

    # several batches: the deterministic parts (grid search, the fitted perturbation) give the same points
    grid = "spatial:angle=20,shift=1,angles=9,shifts=3,attacks=grid"
    with ResultsStore(tmp_path / "many.db") as store:
        many = run(model, test, _protocol(train, [grid, UNIVERSAL]), store, batch_size=7, seed=seed)
        got = {t: [r["robust"] for r in store.sample_rows("structured_samples", many.run_id, t)]
               for t in many.summary["threats"]}
    lib_grid = evaluate_spatial(model, x, y, parse_threat(grid).attacks)
    assert got[parse_threat(grid).name] == [int(v) for v in lib_grid.robust]
    assert got[specs[1].name] == robust[specs[1].name]


@pytest.mark.parametrize("threat, message", [
    ("bogus:x=1", "unknown threat 'bogus'; use one of spatial, universal, patch"),
    ("patch:size=9", "a 9x9 patch does not fit a 8x8 image"),
    ("universal:norm=linf,eps=1.5", "eps 1.5 is outside the [0, 1] pixel box"),
    ("universal:norm=l2", "threat universal needs eps=..."),
    ("patch:size=3,foo=2", "threat patch has no parameter foo"),
    ("spatial:attacks=grid+pgd", "attacks must be grid, fo or grid+fo"),
])
def test_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, threat, message):
    db = tmp_path / "bad.db"
    assert main(["structured", "--model", str(checkpoint), "--data", "digits", "--threat", threat,
                 "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab: error: ") and message in err[0]
    assert not db.exists()


def test_no_training_data_for_a_fit_is_refused_before_the_store(checkpoint, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    for label in ("0", "1"):
        (folder / "test" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / "test" / label / f"{i}.png")
    db = tmp_path / "bad.db"
    assert main(["structured", "--model", str(checkpoint), "--data", f"{folder}/", "--threat", UNIVERSAL,
                 "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is fitted on training images, but" in err[0] and "no train split" in err[0]
    assert main(["structured", "--model", str(checkpoint), "--data", "digits", "--threat", PATCH, "--fit-n", "0",
                 "--db", str(db)]) == 2
    assert "--fit-n must be >= 1" in capsys.readouterr().err
    assert not db.exists()
    with pytest.raises(RobustlabError, match="is fitted on training images, and none were given"):
        StructuredProtocol([parse_threat(PATCH)], (1, 8, 8), None)
    with pytest.raises(RobustlabError, match="given twice"):
        StructuredProtocol([parse_threat(SPATIAL), parse_threat("spatial:angle=20,shift=1")], (1, 8, 8))


def test_leaderboard_strength_of_each_threat_model():
    def view(spec: str, fit_n: int) -> dict:
        t = parse_threat(spec)
        return {"config": {"threats": [t.config()], "fit": {"n": fit_n}}}

    assert StructuredProtocol.leaderboard_strength(view("spatial:angle=30,shift=3", 0)) == []
    assert StructuredProtocol.leaderboard_strength(view("universal:eps=0.1", 1000)) == []
    assert StructuredProtocol.leaderboard_strength(view("patch:size=4", 1000)) == []
    assert "no grid search" in StructuredProtocol.leaderboard_strength(view("spatial:attacks=fo", 0))[0]
    weak = StructuredProtocol.leaderboard_strength(view("patch:size=4,epochs=3,stride=4,draws=2", 100))
    assert len(weak) == 4



def test_full_strength_runs_rank_only_within_their_threat_model(checkpoint, tmp_path, capsys):
    from helpers import save_tiny_net

    _, tiny = save_tiny_net(tmp_path / "tiny")
    db = tmp_path / "rank.db"
    base = ["structured", "--data", "digits", "--n", "40", "--device", "cpu", "--db", str(db), "--json"]
    universal = ["--threat", "universal:norm=linf,eps=0.2", "--fit-n", "1000"]  # the defaults: full strength
    assert main([*base, "--model", str(checkpoint), *universal]) == 0
    assert main([*base, "--model", str(tiny), *universal]) == 0
    assert main([*base, "--model", str(checkpoint), "--threat", "spatial:angle=30,shift=3,attacks=grid"]) == 0
    capsys.readouterr()
    with ResultsStore(db, readonly=True) as store:
        groups = {g.title: g for g in leaderboard(store)}
    assert sorted(groups) == ["digits · spatial angle<=30deg shift<=3px", "digits · universal linf eps=0.2"]
    ranked = groups["digits · universal linf eps=0.2"].rows
    assert [r.rank for r in ranked] == [1, 2] and ranked[0].robust_accuracy >= ranked[1].robust_accuracy
    assert {r.entry.name for r in ranked} == {str(checkpoint), str(tiny)}
    (alone,) = groups["digits · spatial angle<=30deg shift<=3px"].rows
    assert alone.rank == 1 and alone.entry.name == str(checkpoint)
