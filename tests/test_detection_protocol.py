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
def fitted(digits_model, digits_train):
    detector = build_detector("mahalanobis").fit(digits_model, digits_train.x[:600], digits_train.y[:600])
    return detector, calibrate(detector, digits_model, digits_train.x[600:1000], 0.05, "digits:train[600:1000]")


def _rows(store, run_id):
    return [tuple(r)[2:-1] for r in store.sample_rows("detection_samples", run_id, "main")]  # without run, task, seconds


def _numbers(summary):
    """A summary without its timings."""
    out = {k: v for k, v in summary.items() if k != "seconds"}
    out["attacks"] = {a: {k: v for k, v in d.items() if k != "seconds"} for a, d in summary["attacks"].items()}
    return out


def test_rows_follow_the_threshold_and_the_summary_follows_the_rows(digits_model, digits_test, fitted, tmp_path):
    detector, cal = fitted
    data = digits_test.subset(60)
    with ResultsStore(tmp_path / "d.db") as store:
        result = run(digits_model, data, DetectionProtocol(detector, THREAT, cal, OPTIONS, {"n": 600}), store,
                     batch_size=32, examples=0)
        rows = store.sample_rows("detection_samples", result.run_id, "main")
        config = store.get_run(result.run_id)["config"]
        paths = write_report(store, result.run_id, tmp_path / "report")
        board = leaderboard(store)
    page = paths["html"].read_text()
    assert "Detection report" in page and f"{cal.threshold:.6g}" in page and "fixed before any attack" in page
    assert len(paths["samples"].read_text().splitlines()) == 61
    (group,) = board
    assert "mahalanobis" in group.title and "weaker than the default" in " ".join(group.rows[0].notes)
    assert len(rows) == 60 and config["threshold"] == cal.threshold and config["fpr"] == 0.05
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


def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(digits_model, digits_test, fitted, tmp_path, monkeypatch):
    detector, cal = fitted
    data = digits_test.subset(48)

    def protocol():
        return DetectionProtocol(detector, THREAT, cal, OPTIONS, {"n": 600})

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


def test_unfitted_detector_and_bad_fpr_are_refused(digits_model, tmp_path, capsys):
    with pytest.raises(RobustlabError, match="not fitted"):
        DetectionProtocol(build_detector("magnet"), THREAT, calibrate(build_detector("squeeze"), digits_model,
                                                                      torch.rand(20, 1, 8, 8)))
    code = main(["detect", "--model", "digits_cnn", "--data", "digits", "--detector", "squeeze", "--norm", "linf",
                 "--eps", "0.1", "--fpr", "1.5", "--db", str(tmp_path / "d.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["robustlab: error: --fpr must be in (0, 1) (a false-positive rate), got 1.5"]


def test_cli_refits_the_detector_identically_so_resume_finds_the_run(tmp_path, capsys):
    """`robustlab detect --resume` refits the detector (seeded) and fixes the same threshold, so the
    configuration hash matches and a finished run is found again rather than started anew."""
    from robustlab.models import ModelCard, create_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(create_model("digits_cnn", num_classes=10), tmp_path / "m.safetensors",
                    ModelCard.for_architecture("digits_cnn", num_classes=10))
    args = ["detect", "--model", str(tmp_path / "m.safetensors"), "--data", "digits", "--n", "16", "--detector",
            "lid:reference=100", "--norm", "linf", "--eps", "0.1", "--fit-n", "300", "--calibration-n", "100",
            "--adaptive-steps", "5", "--adaptive-rounds", "1", "--db", str(tmp_path / "d.db"), "--resume", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert "already complete" in captured.err and again["run_id"] == first["run_id"] and again["resumed"]
    assert again["threshold"] == first["threshold"] and again["robust_accuracy"] == first["robust_accuracy"]
