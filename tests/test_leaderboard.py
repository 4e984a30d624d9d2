"""The leaderboard: one entry per model (weights hash + defenses), ranks only among full evaluations,
columns from each protocol's summary, the static site's files and RobustBench-style records, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from leaderboard_store import add_run

from robustlab.cli import main
from robustlab.eval.protocols import PROTOCOLS, Protocol
from robustlab.eval.store import ResultsStore
from robustlab.report import (
    build_leaderboard,
    format_leaderboard,
    leaderboard,
    write_site,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path: Path):
    with ResultsStore(tmp_path / "runs.db") as s:
        yield s


def test_one_model_is_one_entry_whatever_its_name(store):
    first = add_run(store, "zoo:wrn", sha=SHA_A, robust=9)
    again = add_run(store, "checkpoints/wrn.safetensors", sha=SHA_A, robust=7)
    other = add_run(store, "zoo:wrn", sha=SHA_B, robust=8)  # same name, other weights: another model
    defended = add_run(store, "zoo:wrn", sha=SHA_A, robust=12, defenses=[{"name": "jpeg", "params": {"quality": 75}}])
    board = build_leaderboard(store)
    (group,) = board.groups
    assert len(board.models) == 3 and len(group.rows) == 3
    wrn = next(r for r in group.rows if r.entry.run_id in (first, again))
    assert {e.run_id for e in wrn.runs} == {first, again}
    assert board.models[wrn.model_id].names == ["zoo:wrn", "checkpoints/wrn.safetensors"]
    assert board.models[wrn.model_id].sha256 == SHA_A
    # Each attack list gives an upper bound on robust accuracy: the entry is the lowest full one.
    assert wrn.run_id == again and wrn.robust_accuracy == pytest.approx(7 / 20)
    ids = {r.run_id: r.model_id for r in group.rows}
    assert ids[other] != wrn.model_id and ids[defended] not in (wrn.model_id, ids[other])
    assert "defended: jpeg" in next(r for r in group.rows if r.run_id == defended).notes


def test_only_full_evaluations_are_ranked(store):
    full_lo = add_run(store, "lo", sha="1" * 64, robust=5)
    full_hi = add_run(store, "hi", sha="2" * 64, robust=10)
    tie = add_run(store, "tie", sha="3" * 64, robust=10)
    weak = add_run(store, "weak-attacks", sha="4" * 64, robust=18, clean=19,
                   attacks=[{"name": "apgd-ce", "params": {"steps": 10, "restarts": 1, "eot": 1, "rho": 0.75}}])
    few = add_run(store, "few", sha="5" * 64, n=10, clean=10, robust=10)
    declared = add_run(store, "declared", sha="6" * 64, robust=6,
                       attacks=[{"name": "pgd", "params": {"steps": 1000}}],
                       declared={"at_least": "standard", "reason": "adaptive attack of the paper's appendix"})
    (group,) = leaderboard(store)
    order = [r.run_id for r in group.rows]
    # Ranked: the full evaluations, best first, ties share a rank; then the rest, unranked, whatever their number.
    assert order[:4] == [full_hi, tie, declared, full_lo] or order[:4] == [tie, full_hi, declared, full_lo]
    assert [r.rank for r in group.rows] == [1, 1, 3, 4, None, None]
    assert set(order[4:]) == {weak, few}
    rows = {r.run_id: r for r in group.rows}
    assert rows[weak].robust_accuracy > rows[full_hi].robust_accuracy
    assert any("lacks apgd-ce (steps 10 < 100), apgd-t, fab-t, square" in n for n in rows[weak].notes)
    assert "n = 10 of the group's 20" in rows[few].notes
    assert any("declared at least standard: adaptive attack" in n for n in rows[declared].notes)
    assert group.full_n == 20

    text = format_leaderboard([group])
    assert "(6 models, 4 ranked)" in text
    lines = [line for line in text.splitlines() if "weak-attacks" in line]
    assert lines and lines[0].lstrip().startswith("-")


def test_a_randomized_model_needs_the_rand_ensemble(store):
    plain = add_run(store, "noisy", sha="7" * 64, randomized=True)            # standard: no EOT
    eot = add_run(store, "noisy-eot", sha="8" * 64, randomized=True, attacks="rand")
    rows = {r.run_id: r for r in leaderboard(store)[0].rows}
    assert rows[plain].rank is None and any("weaker than the rand ensemble" in n for n in rows[plain].notes)
    assert rows[eot].rank == 1


def test_groups_split_by_data_split_and_threat(store):
    add_run(store, "m", sha=SHA_A)
    add_run(store, "m", sha=SHA_A, split="val")
    add_run(store, "m", sha=SHA_A, eps=4 / 255)
    add_run(store, "m", sha=SHA_A, norm="l2", eps=0.5)
    board = build_leaderboard(store)
    assert sorted(g.title for g in board.groups) == [
        "cifar10 · L2 ε = 0.5", "cifar10 · L∞ ε = 4/255 (0.01569)", "cifar10 · L∞ ε = 8/255 (0.03137)",
        "cifar10 · L∞ ε = 8/255 (0.03137) (val)"]
    assert len(board.models) == 1 and len(board.models[board.groups[0].rows[0].model_id].runs) == 4
    assert all(g.rows[0].rank == 1 for g in board.groups)
    # Two image folders under one data set name are two data sets.
    add_run(store, "m", sha=SHA_A, dataset="imagenet-val", extra={"data_fingerprint": "0123456789abcdef"})
    add_run(store, "m", sha=SHA_A, dataset="imagenet-val", extra={"data_fingerprint": "fedcba9876543210"})
    folders = [g for g in build_leaderboard(store).groups if g.dataset == "imagenet-val"]
    assert sorted(g.title[-16:] for g in folders) == ["[files 01234567]", "[files fedcba98]"]


class _CorruptionLike(Protocol):
    """A protocol the leaderboard has never seen: lower mCE is better, accuracy breaks ties."""

    name = "test-corruption"
    leaderboard_columns: ClassVar[tuple[str, ...]] = ("-mce", "corruption_accuracy")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        return (run["dataset"], "suite-a"), f"{run['dataset']} · corruptions (suite a)"


def test_columns_and_order_come_from_the_protocol(store, monkeypatch, tmp_path):
    monkeypatch.setitem(PROTOCOLS, _CorruptionLike.name, _CorruptionLike)
    ids = []
    for name, mce, acc in (("good", 0.6, 0.7), ("bad", 0.9, 0.5), ("mid", 0.6, 0.6)):
        config = {"model": name, "model_sha256": None, "dataset": "cifar10", "split": "test", "n": 50, "seed": 0}
        run = store.create_run(_CorruptionLike.name, config, {}, {})
        store.finish_run(run, {"mce": mce, "corruption_accuracy": acc, "n": 50,
                               "per_corruption": [{"severity": s, "corruption_accuracy": acc - 0.1 * s} for s in (1, 2, 3)]},
                         [])
        ids.append(run)
    (group,) = leaderboard(store)
    assert group.title == "cifar10 · corruptions (suite a)"
    assert group.columns == ("-mce", "corruption_accuracy")
    assert [r.model for r in group.rows] == ["good", "mid", "bad"] and [r.rank for r in group.rows] == [1, 2, 3]
    text = format_leaderboard([group])
    assert "mce ↓" in text and "60.00%" in text
    site = write_site(store, tmp_path / "site", reports=False)
    page = (tmp_path / "site" / "models" / f"{group.rows[0].model_id}.html").read_text()
    assert "per corruption" in page and "<polyline" in page  # its curve, found in the summary
    assert "corruptions (suite a)" in site.index.read_text()


def _links(page: Path) -> list[str]:
    return re.findall(r'href="([^"#]+)"', page.read_text())


def test_site_files_links_and_robustbench_records(store, tmp_path):
    top = add_run(store, "zoo:wrn", sha=SHA_A, robust=9)
    add_run(store, "wrn.safetensors", sha=SHA_A, robust=11)
    weak = add_run(store, "small", sha=SHA_B, robust=15, attacks=[{"name": "apgd-ce", "params": {"steps": 100}}])
    result = write_site(store, tmp_path / "site")
    root = tmp_path / "site"
    assert result.model_pages == 2 and result.json_records == 2 and result.reports_written == 3
    pages = [root / "index.html", *sorted((root / "models").glob("*.html"))]
    for page in pages:  # every link of every page leads to a file of the site, nothing online
        for href in _links(page):
            assert not href.startswith(("http:", "https:", "//")), href
            assert (page.parent / href).resolve().is_file(), (page, href)
        assert "<script src" not in page.read_text()
    record = json.loads(next((root / "json" / "cifar10" / "test" / "Linf-8_255").glob("*.json")).read_text())
    records = {r["robustlab"]["run_id"]: r for r in json.loads((root / "leaderboard.json").read_text())["groups"][0]["rows"]}
    rb = records[top]
    assert {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
            "eps", "clean_acc", "reported", "autoattack_acc", "unreliable"} <= set(rb)
    assert rb["eps"] == "8/255" and rb["clean_acc"] == "80.00" and rb["autoattack_acc"] == "45.00"
    assert rb["architecture"] == "resnet18" and rb["robustlab"]["weights_sha256"] == SHA_A and rb["robustlab"]["rank"] == 1
    assert rb["robustlab"]["aliases"] == ["zoo:wrn", "wrn.safetensors"] and len(rb["robustlab"]["runs"]) == 2
    assert records[weak]["autoattack_acc"] is None and "lacks" in records[weak]["footnote"]
    assert record["name"] in ("zoo:wrn", "small")
    # A second build rewrites no report that is up to date.
    assert write_site(store, root).reports_written == 0


def test_cli_help_says_where_it_writes_and_writes_there(store, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["leaderboard", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--site DIR" in help_text and "./leaderboard/" in help_text and "index.html" in help_text
    add_run(store, "m", sha=SHA_A)
    db = str(store.path)
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard", "--db", db, "--no-reports"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "leaderboard" / "index.html").is_file() and "leaderboard/index.html" in err
    assert main(["leaderboard", "--db", db, "--no-site"]) == 0
    assert "cifar10 · L∞ ε = 8/255" in capsys.readouterr().out
    assert main(["leaderboard", "--db", db, "--out", "lb.html"]) == 2  # the single page of earlier releases
    assert "--site DIR" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["leaderboard", "--db", db, "--site", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_cli_declared_strength_is_recorded_and_ranked(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    common = ["eval", "--model", "digits_mlp", "--data", "digits", "--n", "20", "--norm", "linf", "--eps", "0.1",
              "--attack", "fgsm", "--no-sanity", "--steps-grid", "none", "--db", db]
    assert main([*common, "--stronger-than", "standard: a stand-in for the paper's adaptive attack"]) == 0
    assert main([*common, "--seed", "1"]) == 0  # the same model, undeclared: shown, not ranked
    capsys.readouterr()
    with ResultsStore(db) as store:
        (group,) = leaderboard(store)
    (row,) = group.rows  # one model (random weights: known by its name)
    assert row.rank == 1 and len(row.runs) == 2
    assert row.entry.config["declared_strength"] == {"at_least": "standard",
                                                     "reason": "a stand-in for the paper's adaptive attack"}
    assert any("declared at least standard" in n for n in row.notes)
    assert not row.runs[1].full and "weaker than the standard ensemble" in row.runs[1].marks[0]
