"""Metrics as objects: merging per-batch (or per-rank) states gives the numbers of one pass."""

from __future__ import annotations

import random

import pytest

from robustlab.eval.metrics import (
    CertifiedAccuracy,
    CorruptionError,
    RobustAccuracy,
    ZeroShotAccuracy,
    merge_all,
    wilson_interval,
)


def _chunks(items, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(items[i:i + s])
        i += s
    return out


def test_robust_accuracy_merges_to_one_pass():
    rng = random.Random(0)
    rows = []
    for _ in range(257):
        clean = rng.random() < 0.9
        by = rng.choice([None, 0, 1, 2]) if clean else None
        rows.append((clean, clean and by is None, by))
    one = RobustAccuracy().update(*zip(*rows))
    parts = [RobustAccuracy().update(*zip(*c)) for c in _chunks(rows, [100, 1, 56, 100])]
    merged = merge_all(parts)
    assert merged.compute() == one.compute()
    assert merged.after_each(3) == one.after_each(3)
    n_clean = sum(r[0] for r in rows)
    assert one.compute()["clean_accuracy"] == n_clean / 257
    assert one.after_each(3)[-1][1] == one.compute()["robust_accuracy"]
    assert one.compute()["ci95"]["robust"] == wilson_interval(one.compute()["robust_accuracy"], 257)


def test_certified_accuracy_at_radii_and_acr():
    correct = [True, True, False, True, True]
    radius = [0.3, None, 0.9, 1.2, 0.0]
    m = CertifiedAccuracy((0.0, 0.25, 0.5, 1.0)).update(correct, radius)
    out = m.compute()
    assert out["certified_accuracy"] == {0.0: 3 / 5, 0.25: 2 / 5, 0.5: 1 / 5, 1.0: 1 / 5}
    assert out["acr"] == pytest.approx((0.3 + 1.2 + 0.0) / 5)
    assert out["abstain_rate"] == 1 / 5
    a = CertifiedAccuracy((0.0, 0.25, 0.5, 1.0)).update(correct[:2], radius[:2])
    b = CertifiedAccuracy((0.0, 0.25, 0.5, 1.0)).update(correct[2:], radius[2:])
    assert a.merge(b).compute() == out
    with pytest.raises(ValueError):
        a.merge(CertifiedAccuracy((0.0,)))


def test_corruption_error_ce_and_mce():
    m = CorruptionError()
    m.update("clean", 0, [True] * 9 + [False])           # clean error 0.1
    m.update("fog", 1, [True] * 8 + [False] * 2)         # 0.2
    m.update("fog", 2, [True] * 6 + [False] * 4)         # 0.4
    m.update("noise", 1, [True] * 5 + [False] * 5)       # 0.5
    base = {"clean": {0: 0.2}, "fog": {1: 0.4, 2: 0.6}, "noise": {1: 0.5}}
    out = m.compute(base)
    assert out["errors"]["fog"] == {1: 0.2, 2: 0.4}
    assert out["ce"] == {"fog": pytest.approx(0.6 / 1.0), "noise": pytest.approx(1.0)}
    assert out["mce"] == pytest.approx(0.8)
    assert out["relative_ce"]["fog"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.4))
    halves = CorruptionError().update("fog", 1, [True] * 8).merge(CorruptionError().update("fog", 1, [False] * 2))
    assert halves.errors()["fog"][1] == pytest.approx(0.2)


def test_zero_shot_accuracy_averages_over_datasets():
    a = ZeroShotAccuracy().update("mnist", [True, True, False, True], [True, False, False, False])
    b = ZeroShotAccuracy().update("cifar10", [True, False], [False, False]).update("mnist", [True], [True])
    out = a.merge(b).compute()
    assert out["datasets"]["mnist"] == {"n": 5, "clean_accuracy": 0.8, "robust_accuracy": 0.4}
    assert out["average"]["clean_accuracy"] == pytest.approx((0.8 + 0.5) / 2)
    assert out["average"]["robust_accuracy"] == pytest.approx(0.2)
