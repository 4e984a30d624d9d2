"""The adversarial protocol gives the per-sample outcomes and summary of the release before the
evaluation core (b9ac979): tests/golden/record.json was written by that release
(tests/golden/make_golden.py) from the weights beside it.

Every outcome (predictions, which attack broke a point, counts) must be identical. Floats (norms of
the perturbations found) are compared to a relative 1e-5: float32 arithmetic depends on the CPU's
vector kernels, and an iterative attack carries the rounding of every step. The release itself, run on
another machine (2026-12-06), gave norms up to 1.6e-6 (relative) away from the ones it recorded, with
every outcome identical. A real change of an attack moves norms by far more."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

from golden_spec import ATTACKS, N, OPTIONS, THREAT, record, same  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.data import load_dataset  # noqa: E402
from robustlab.eval import EvalOptions, ResultsStore, evaluate  # noqa: E402
from robustlab.models import load_model  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "record.json").read_text())


def _same_summary(expected, got, path="summary"):
    """Every number the release's summary has is in the new one, equal (new keys may be added)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), path
        for k, v in expected.items():
            assert k in got, f"{path}.{k} is missing"
            _same_summary(v, got[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(expected, got)):
            _same_summary(a, b, f"{path}[{i}]")
    else:
        assert same(got, expected), f"{path}: {got!r} != release {expected!r}"



def test_adversarial_protocol_matches_the_release(golden, tmp_path):
    model = load_model(str(GOLDEN / "digits_cnn.safetensors")).model.eval()
    data = load_dataset("digits", "test").subset(N)
    threat = ThreatModel(*THREAT)
    attacks = [create_attack(name, threat, **params) for name, params in ATTACKS]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ResultsStore(tmp_path / "r.db") as store:
            result = evaluate(model, data, attacks, store, model_name="digits_cnn_golden", options=EvalOptions(**OPTIONS))
            got = record(store, result.run_id, result.summary, result.checks)
    finally:
        torch.set_num_threads(saved)
    assert set(got["tasks"]) == set(golden["tasks"])
    for task, rows in golden["tasks"].items():
        assert same(got["tasks"][task], rows), f"task {task}: per-sample outcomes differ from the release"
    # The one deliberate change since the release: the reported robust accuracy is the per-sample worst
    # case over everything the run computed inside the main ball (here the steps curve's PGD broke
    # points the ensemble left robust); the ensemble's own number is the release's.
    expected = worst_case_from_rows(golden)
    assert expected < golden["summary"]["robust_accuracy"]
    assert got["summary"]["ensemble_robust_accuracy"] == golden["summary"]["robust_accuracy"]
    assert got["summary"]["robust_accuracy"] == expected
    release = json.loads(json.dumps(golden["summary"]))
    release["robust_accuracy"] = expected
    for p in release["eps_curve"]:
        if p["eps"] == THREAT[1]:
            p["robust_accuracy"] = expected
    _same_summary(release, got["summary"])
    assert [c for c in got["checks"] if c in golden["checks"]] == golden["checks"]
    (verdict,) = [c for c in got["checks"] if c["name"] == "worst-case"]
    assert verdict["status"] == "warn" and "steps=10" in verdict["detail"]


def worst_case_from_rows(golden) -> float:
    """Robust in the main task and not broken by any steps task or smaller-epsilon task (row layout of
    golden_spec.record: index, label, clean_pred, clean_correct, robust, broken_by, ...)."""
    broken = {row[0] for task, rows in golden["tasks"].items()
              if task.startswith("steps=") or (task.startswith("eps=") and float(task[4:]) <= THREAT[1])
              for row in rows if row[3] and not row[4]}
    main = golden["tasks"]["main"]
    return sum(1 for row in main if row[4] and row[0] not in broken) / len(main)
