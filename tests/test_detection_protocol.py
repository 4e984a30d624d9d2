"""The detection protocol: per-sample rows that agree with the threshold and the definition of a fooled
point, a summary computed from them, a killed run resumed to identical rows, the threshold giving the
false-positive rate asked on clean images, the detector-aware attack beating plain PGD (and the first
adaptive attack) on a detector it can only evade by changing its perturbation, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from robustlab.attacks import create_attack
from robustlab.attacks.detector_aware import DetectorAwareOptions, detector_aware_attack
from robustlab.cli import main
from robustlab.defenses.detection import (
    build_detector,
    detector_aware_pgd,
    threshold_at,
)
from robustlab.errors import RobustlabError
from robustlab.eval.protocols.detection import (
    DetectionOptions,
    DetectionProtocol,
    DetectorData,
    calibrate,
)
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore
from robustlab.report.html import write_report
from robustlab.report.leaderboard import leaderboard
from robustlab.threat import ThreatModel

THREAT = ThreatModel("linf", 0.2)
OPTIONS = DetectionOptions(pgd_steps=10, adaptive=DetectorAwareOptions(steps=15, rounds=2))


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def fitting(digits_train):
    x, y = digits_train.x, digits_train.y
    return DetectorData(x[:600], y[:600], x[600:1000], 0.05, "digits:train[0:600]", "digits:train[600:1000]")


@pytest.fixture(scope="module")
def fitted(digits_model, fitting):
    detector = build_detector("mahalanobis").fit(digits_model, fitting.x, fitting.y)
    return detector, calibrate(detector, digits_model, fitting.x_cal, 0.05, fitting.cal_source)


def _rows(store, run_id):
    return [tuple(r)[2:-1] for r in store.sample_rows("detection_samples", run_id, "main")]  # without run, task, seconds


def _numbers(summary):
    """A summary without its timings."""
    out = {k: v for k, v in summary.items() if k != "seconds"}
    out["attacks"] = {a: {k: v for k, v in d.items() if k != "seconds"} for a, d in summary["attacks"].items()}
    return out


def test_rows_follow_the_threshold_and_the_summary_follows_the_rows(digits_model, digits_test, fitting, fitted,
                                                                    tmp_path):
    _, cal = fitted  # the threshold the run must fix for itself in prepare
    data = digits_test.subset(60)
    with ResultsStore(tmp_path / "d.db") as store:
        protocol = DetectionProtocol(build_detector("mahalanobis"), THREAT, fitting, OPTIONS)
        result = run(digits_model, data, protocol, store, batch_size=32, examples=0)
        rows = store.sample_rows("detection_samples", result.run_id, "main")
        config = store.get_run(result.run_id)["config"]
        paths = write_report(store, result.run_id, tmp_path / "report")
        board = leaderboard(store)
    page = paths["html"].read_text()
    assert "Detection report" in page and f"{cal.threshold:.6g}" in page and "fixed before any attack" in page
    assert len(paths["samples"].read_text().splitlines()) == 61
    (group,) = board
    assert "mahalanobis" in group.title and "weaker than the default" in " ".join(group.rows[0].notes)
    # fitted inside the run (its fast memory layout): the same threshold up to float rounding
    assert protocol.calibration.threshold == pytest.approx(cal.threshold, rel=1e-5)
    assert result.summary["threshold"] == protocol.calibration.threshold
    cal = protocol.calibration
    assert len(rows) == 60 and config["fpr"] == 0.05 and "threshold" not in config
    for r in rows:
        assert r["clean_flagged"] == (r["clean_score"] > cal.threshold)
        for a in ("pgd", "adaptive"):
            if not r["clean_correct"]:
                assert r[f"{a}_pred"] is None  # only correctly classified points are attacked
                continue
            assert r[f"{a}_flagged"] == (r[f"{a}_score"] > cal.threshold)
            assert r[f"{a}_fooled"] == (r[f"{a}_pred"] != r["label"] and not r[f"{a}_flagged"])
        assert r["robust"] == (r["clean_correct"] and not r["pgd_fooled"] and not r["adaptive_fooled"])
    s = result.summary
    assert s["robust_accuracy"] == pytest.approx(sum(r["robust"] for r in rows) / 60)
    assert s["clean_accuracy"] == pytest.approx(sum(r["clean_correct"] for r in rows) / 60)
    wrong = [r for r in rows if r["pgd_pred"] is not None and r["pgd_pred"] != r["label"]]
    assert s["detection_rate"] == pytest.approx(sum(r["pgd_flagged"] for r in wrong) / len(wrong))
    # the honest number: at most the non-adaptive one, and the adaptive attack leaves fewer points detected
    assert s["robust_accuracy"] <= s["non_adaptive"]["robust_accuracy"]
    assert s["attacks"]["adaptive"]["fooled"] >= s["attacks"]["pgd"]["fooled"]
    assert s["robust_accuracy"] < s["clean_accuracy"]
    assert [c["name"] for c in result.checks][-1] == "adaptive attack"


def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(digits_model, digits_test, fitting, tmp_path,
                                                                monkeypatch):
    data = digits_test.subset(48)

    def protocol():
        return DetectionProtocol(build_detector("mahalanobis"), THREAT, fitting, OPTIONS)

    with ResultsStore(tmp_path / "full.db") as store:
        full = run(digits_model, data, protocol(), store, seed=3, batch_size=16, examples=0)
        expected = _rows(store, full.run_id)
    original = DetectionProtocol.run_batch
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed")
        return original(self, *args, **kwargs)

    with ResultsStore(tmp_path / "resumed.db") as store:
        monkeypatch.setattr(DetectionProtocol, "run_batch", crashing)
        with pytest.raises(Crash):
            run(digits_model, data, protocol(), store, seed=3, batch_size=16, examples=0)
        monkeypatch.undo()
        resumed = run(digits_model, data, protocol(), store, seed=3, batch_size=16, examples=0, resume=True)
        assert resumed.resumed
        assert _rows(store, resumed.run_id) == expected
    assert _numbers(resumed.summary) == _numbers(full.summary)


def test_threshold_flags_the_false_positive_rate_asked_on_clean_images(digits_model, fitted, digits_train):
    detector, _ = fitted
    clean = digits_train.x[600:1000]
    for fpr in (0.01, 0.05, 0.2):
        cal = calibrate(detector, digits_model, clean, fpr)
        flagged = int((detector.score(digits_model, clean) > cal.threshold).sum())
        assert fpr * len(clean) - 1 <= flagged <= fpr * len(clean)
    with pytest.raises(RobustlabError, match="false-positive rate"):
        threshold_at(torch.rand(10), 0.0)


def test_detector_aware_attack_evades_a_detector_plain_pgd_trips(digits_model, digits_test):
    """A detector of perturbed borders (digits have empty ones): PGD writes there and is often caught;
    the detector-aware attack moves only the inside, fooling more than PGD and at least as many as the
    first adaptive attack (CE with a fixed-weight hinge)."""
    model = digits_model
    mask = torch.ones(8, 8)
    mask[2:-2, 2:-2] = 0

    def border(x):
        return (x * mask).flatten(1).sum(1)

    class Border:
        def score(self, m, x):
            return border(x)

    x, y = digits_test.x[:100], digits_test.y[:100]
    keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    tau = threshold_at(border(digits_test.x[200:400]), 0.05)

    def fooled(x_adv):
        assert THREAT.contains(x_adv, x).all()
        with torch.no_grad():
            return int(((model(x_adv).argmax(1) != y) & (border(x_adv) <= tau)).sum())

    pgd = create_attack("pgd", THREAT, steps=20).run(model, x, y, torch.Generator().manual_seed(0)).x_adv
    old = detector_aware_pgd(model, Border(), x, y, THREAT, tau, steps=50, weight=2.0,
                             generator=torch.Generator().manual_seed(0))
    new = detector_aware_attack(model, border, x, y, THREAT, tau, float(border(digits_test.x[200:400]).std()),
                                DetectorAwareOptions(steps=25, rounds=2), torch.Generator().manual_seed(0))
    assert fooled(new.x_adv) == int(new.success.sum())
    assert fooled(new.x_adv) >= fooled(pgd) + 10
    assert fooled(new.x_adv) >= fooled(old)


def test_consistent_views_round_only_adds_and_a_fooling_start_is_kept(digits_model, digits_test):
    """Given the detector's views (feature squeezing's squeezed copies), a consistent round first pushes
    the input and every view to one wrong class; the rounds after it start where it started, so every
    point fooled without it is fooled with it. A start (``init``) that already fools classifier and
    detector is returned as it is, without a gradient."""
    model, det = digits_model, build_detector("squeeze:bits=1,median=2")
    x, y = digits_test.x[:100], digits_test.y[:100]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    clean = det.score(model, digits_test.x[200:400]).detach()
    tau, scale = threshold_at(clean, 0.05), float(clean.std())
    threat, options = ThreatModel("linf", 0.1), DetectorAwareOptions(steps=25, rounds=2)

    def attack(views=None, init=None, xs=x, ys=y):
        return detector_aware_attack(model, lambda z: det.score(model, z), xs, ys, threat, tau, scale, options,
                                     torch.Generator().manual_seed(0), views=views, init=init)

    plain, viewed = attack(), attack(views=det.views)
    assert plain.success.sum() >= 10 and not (plain.success & ~viewed.success).any()
    with torch.no_grad():  # success is the exact check: misclassified and not flagged
        assert torch.equal(viewed.success, (model(viewed.x_adv).argmax(1) != y) & (det.score(model, viewed.x_adv) <= tau))
    hit = viewed.success
    again = attack(init=viewed.x_adv[hit], xs=x[hit], ys=y[hit])
    assert again.success.all() and (again.gradients == 0).all() and torch.equal(again.x_adv, viewed.x_adv[hit])
    old = {"adaptive": {"name": "detector-aware", "params": {"steps": 100, "rounds": 4}}}  # stored before the round
    assert DetectionProtocol.normalize_config(old)["adaptive"]["params"]["views_first"] is False


@pytest.mark.parametrize("spec, message", [
    ("squeez", "unknown detector 'squeez'"),
    ("squeeze:bits=9", "bits must be in 0..8"),
    ("squeeze:bits=0,median=0", "at least one squeezer"),
    ("lid:kk=3", "has no parameter kk"),
    ("magnet:steps", "must be written key=value"),
])
def test_bad_detector_specs_are_one_line_errors(spec, message, capsys, tmp_path):
    db = tmp_path / "d.db"
    code = main(["detect", "--model", "digits_cnn", "--data", "digits", "--detector", spec, "--norm", "linf",
                 "--eps", "0.1", "--db", str(db)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("robustlab: error:") and message in err[0]
    assert not db.exists()


def test_bad_fit_data_and_bad_fpr_are_refused(tmp_path, capsys):
    with pytest.raises(RobustlabError, match="at least 2 clean calibration images"):
        DetectorData(torch.rand(20, 1, 8, 8), torch.zeros(20, dtype=torch.long), torch.rand(1, 1, 8, 8))
    with pytest.raises(RobustlabError, match="one label each"):
        DetectorData(torch.rand(20, 1, 8, 8), torch.zeros(19, dtype=torch.long), torch.rand(5, 1, 8, 8))
    code = main(["detect", "--model", "digits_cnn", "--data", "digits", "--detector", "squeeze", "--norm", "linf",
                 "--eps", "0.1", "--fpr", "1.5", "--db", str(tmp_path / "d.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["robustlab: error: --fpr must be in (0, 1) (a false-positive rate), got 1.5"]


def _checkpoint(tmp_path):
    from robustlab.models import ModelCard, create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(create_model("digits_cnn", num_classes=10), path, ModelCard.for_architecture("digits_cnn", num_classes=10))
    return str(path)


def test_resumed_cli_run_loads_the_fitted_detector_and_gives_identical_rows(tmp_path, capsys, monkeypatch):
    """The detector is fitted once per run: a killed `robustlab detect` resumed with --resume loads the
    fitted state kept with its run (no second fit, not even for a finished run), fixes the same
    threshold, and ends with the rows of an uninterrupted run."""
    from robustlab.defenses.detection import LID

    fits = {"n": 0}
    original_fit = LID.fit

    def counting_fit(self, *args, **kwargs):
        fits["n"] += 1
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(LID, "fit", counting_fit)
    model = _checkpoint(tmp_path)

    def args(db):
        return ["detect", "--model", model, "--data", "digits", "--n", "48", "--batch-size", "16",
                "--detector", "lid:reference=100", "--norm", "linf", "--eps", "0.1", "--fit-n", "300",
                "--calibration-n", "100", "--pgd-steps", "5", "--adaptive-steps", "5", "--adaptive-rounds", "1",
                "--db", str(tmp_path / db), "--resume", "--json"]

    assert main(args("full.db")) == 0
    full = json.loads(capsys.readouterr().out)
    assert fits["n"] == 1
    original_batch = DetectionProtocol.run_batch
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original_batch(self, *a, **k)

    monkeypatch.setattr(DetectionProtocol, "run_batch", crashing)
    assert main(args("resumed.db")) != 0
    monkeypatch.setattr(DetectionProtocol, "run_batch", original_batch)
    assert fits["n"] == 2 and calls["n"] == 2  # a new run fits; killed in its second batch
    capsys.readouterr()
    assert main(args("resumed.db")) == 0
    captured = capsys.readouterr()
    resumed = json.loads(captured.out)
    assert fits["n"] == 2 and "loaded the state fitted on these 300 training images when this run started" in captured.err
    assert resumed["resumed"] and resumed["threshold"] == full["threshold"]
    with ResultsStore(tmp_path / "full.db") as a, ResultsStore(tmp_path / "resumed.db") as b:
        assert _rows(b, resumed["run_id"]) == _rows(a, full["run_id"])
        assert len(_rows(b, resumed["run_id"])) == 48
    keys = ("clean_accuracy", "robust_accuracy", "auc", "detection_rate", "adaptive_detection_rate", "threshold")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}
    assert main(args("resumed.db")) == 0  # finished: found again, still without fitting
    again = json.loads(capsys.readouterr().out)
    assert fits["n"] == 2 and again["run_id"] == resumed["run_id"]


@pytest.mark.parametrize("spec", ["mahalanobis", "magnet:steps=50", "lid:reference=100"])
def test_fitted_state_restores_the_same_scores(spec, digits_model, digits_train, digits_test):
    from safetensors.torch import load, save

    model, x, y = digits_model, digits_train.x[:300], digits_train.y[:300]
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    fitted = build_detector(spec).fit(model, x, y, x_adv)
    restored = build_detector(spec).load_fitted_state(load(save(fitted.fitted_state())))
    assert restored.fitted
    with torch.no_grad():
        assert torch.equal(restored.score(model, digits_test.x[:50]), fitted.score(model, digits_test.x[:50]))
