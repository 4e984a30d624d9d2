"""What the golden evaluation runs, and how a run is turned into a comparable record (shared by
make_golden.py, which wrote the record with the release, and test_golden.py, which checks against it)."""

from __future__ import annotations

import math
from typing import Any

N = 150
THREAT = ("linf", 0.1)
ATTACKS = [("fgsm", {}), ("pgd", {"steps": 10}), ("square", {"queries": 60}), ("deepfool", {"steps": 20})]
OPTIONS = {"eps_grid": (0.05, 0.2), "batch_size": 64, "seed": 3}
# Wall-clock fields differ from run to run; everything else must be identical.
TIMING = {"seconds", "run_id"}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def record(store, run_id: str, summary: dict, checks: list) -> dict:
    """Per-sample outcomes of every task, the summary and the sanity verdicts, without timings."""
    run = store.get_run(run_id)
    tasks = {}
    for t in run["tasks"]:
        tasks[t["task"]] = [
            [r.sample_index, r.label, r.clean_pred, r.clean_correct, r.robust, r.broken_by, r.adv_pred,
             r.distance, r.gradients, r.forwards, r.min_distance]
            for r in store.samples(run_id, t["task"])
        ]
    return {"tasks": tasks, "summary": _strip(summary), "checks": checks}


def same(got, expected) -> bool:
    """Equal, with floats to a relative 1e-5 (float32 results depend on the CPU: see tests/test_golden.py); lists and dicts element by element."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(same(got[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(expected, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        return math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-12)
    return got == expected
