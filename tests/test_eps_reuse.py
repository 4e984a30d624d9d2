"""Epsilon curves that reuse what is known (``EvalOptions(reuse=True)``, off by default): a point
broken in a smaller ball of the same norm is broken in every larger one, and minimum-norm attacks
give the whole curve from one run."""

from __future__ import annotations

import pytest

from robustlab.attacks import create_attack
from robustlab.eval import EvalOptions, ResultsStore, evaluate
from robustlab.threat import ThreatModel

GRID = (0.03, 0.06, 0.15, 0.2)


def _curve_rows(store, result):
    return {t["task"]: {r.sample_index: r for r in store.samples(result.run_id, t["task"])}
            for t in store.tasks(result.run_id) if t["kind"] in ("main", "eps")}


@pytest.fixture(scope="module")
def runs(digits_model, digits_test, tmp_path_factory):
    data = digits_test.subset(150)
    threat = ThreatModel("linf", 0.1)
    # Deterministic attacks, so that a point's outcome does not depend on which other points share its batch.
    attacks = [create_attack("fgsm", threat), create_attack("pgd", threat, steps=10, random_start=False)]
    out = {}
    with ResultsStore(tmp_path_factory.mktemp("reuse") / "r.db") as store:
        for reuse in (False, True):
            res = evaluate(digits_model, data, attacks, store,
                           options=EvalOptions(eps_grid=GRID, steps_grid=(), sanity=False, batch_size=50, reuse=reuse))
            costs = {t["task"]: sum(c["gradients"] for c in store.attack_costs(res.run_id, t["task"]))
                     for t in store.tasks(res.run_id)}
            out[reuse] = (res, _curve_rows(store, res), costs)
    return out


def test_reuse_is_off_by_default_and_recorded_when_on(runs):
    assert EvalOptions().reuse is False
    plain, reused = runs[False][0], runs[True][0]
    assert plain.run_id != reused.run_id  # different configurations


def test_reuse_never_unbreaks_a_point_and_the_curve_is_monotone(runs):
    _, plain_rows, plain_cost = runs[False]
    res, rows, cost = runs[True]
    for task, by_sample in rows.items():
        for i, r in by_sample.items():
            if not plain_rows[task][i].robust and plain_rows[task][i].clean_correct:
                assert not r.robust, f"{task}: sample {i} broken by the plain run is robust with reuse"
            if r.broken_by is not None:
                eps = float(task.split("=")[1]) if task != "main" else 0.1
                assert r.distance <= eps + 1e-6
    curve = [p["robust_accuracy"] for p in res.summary["eps_curve"]]
    assert curve == sorted(curve, reverse=True)
    # Points broken at smaller epsilons were not attacked again: fewer gradients on the larger balls.
    assert cost["eps=0.15"] < plain_cost["eps=0.15"] and cost["eps=0.2"] < plain_cost["eps=0.2"]
    assert res.summary["robust_accuracy"] == runs[False][0].summary["robust_accuracy"]  # main is untouched


def test_minimum_norm_attacks_give_the_whole_curve_from_one_run(digits_model, digits_test, tmp_path):
    data = digits_test.subset(100)
    threat = ThreatModel("l2", 1.0)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(digits_model, data, [create_attack("deepfool", threat, steps=30)], store,
                       options=EvalOptions(eps_grid=(0.25, 0.5, 2.0), steps_grid=(), sanity=False, reuse=True))
        costs = {t["task"]: sum(c["gradients"] + c["forwards"] for c in store.attack_costs(res.run_id, t["task"]))
                 for t in store.tasks(res.run_id)}
        main = store.samples(res.run_id, "main")
    assert costs["main"] > 0 and all(costs[t] == 0 for t in ("eps=0.25", "eps=0.5", "eps=2"))
    for p in res.summary["eps_curve"]:
        found = sum(1 for r in main if r.clean_correct and r.min_distance is not None and r.min_distance <= p["eps"])
        assert p["robust_accuracy"] == pytest.approx((sum(r.clean_correct for r in main) - found) / len(main))
