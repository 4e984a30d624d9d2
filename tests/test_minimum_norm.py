"""FAB (fixed budget and minimum-norm), DeepFool, CW-L2 and EAD.

What is checked: the exact projection onto a hyperplane within the box (against a generic solver);
on a linear model, where the smallest misclassifying perturbation is known in closed form, the
minimum-norm attacks find it (FAB and DeepFool within a few percent, CW and EAD within ~10%); on the
digits CNN, returned points lie in the box, success flags are what the model predicts, FAB-min's
distances are at least as small as what PGD needs, fixed-budget FAB stays in the ball and agrees
with FAB-min, FAB-T is at least as strong as FAB; per-sample gradient and forward counts are exact;
the model is never changed; bad parameters raise RobustlabError.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS, create_attack
from robustlab.attacks.fab import min_norm_to_hyperplane
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel
from helpers import gen, predict

MIN_NORM = ("fab-min", "fab-t-min", "deepfool", "cw", "ead")
# Small budgets keep the file fast; the algorithms are the published ones.
FAST = {
    "fab-min": {"steps": 30},
    "fab-t-min": {"steps": 15, "n_target_classes": 3},
    "deepfool": {},
    "cw": {"steps": 50, "binary_steps": 6, "lr": 0.05},
    "ead": {"steps": 50, "binary_steps": 6, "lr": 0.05},
    "fab": {"steps": 30},
    "fab-t": {"steps": 15, "n_target_classes": 3},
}
EPS = {"linf": 0.1, "l2": 0.8, "l1": 3.0}


@pytest.fixture(scope="module")
def cnn(digits_model, digits_test):
    """(float64 copy of the digits CNN, 60 test images and labels: the first 55 it classifies
    correctly and 5 it does not): float64 so that a sample's trajectory does not depend on which
    other samples share its batch."""
    model = copy.deepcopy(digits_model).double().eval()
    x, y = digits_test.x.double(), digits_test.y
    correct = predict(model, x) == y
    pick = torch.cat([correct.nonzero()[:55, 0], (~correct).nonzero()[:5, 0]]).sort().values
    assert len(pick) == 60
    return model, x[pick], y[pick]


# ---------------------------------------------------------------------- the projection


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_projection_onto_hyperplane_in_box_is_exact(norm):
    """min ||d|| s.t. <w, d> = r, lo <= d <= hi: compared with scipy's generic solvers; infeasible
    rows get the box corner that comes closest to the hyperplane."""
    np = pytest.importorskip("numpy")
    so = pytest.importorskip("scipy.optimize")
    g = gen(3)
    n, dim = 30, 6
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w[::7, 2] = 0.0
    x = torch.rand(n, dim, generator=g, dtype=torch.float64)
    x[::4, 1], x[::5, 3] = 0.0, 1.0
    r = torch.randn(n, generator=g, dtype=torch.float64)
    lo, hi = -x, 1 - x
    d = min_norm_to_hyperplane(w, r, lo, hi, norm)
    assert bool(((d >= lo - 1e-12) & (d <= hi + 1e-12)).all())
    feasible = 0
    for i in range(n):
        wi, ri, li, hi_i, di = (t[i].numpy() for t in (w, r, lo, hi, d))
        corner = np.where(wi * ri > 0, hi_i, np.where(wi * ri < 0, li, 0.0))
        if abs(wi @ corner) <= abs(ri):  # unreachable: the closest corner
            np.testing.assert_allclose(di, corner, atol=1e-12)
            continue
        feasible += 1
        assert abs(wi @ di - ri) < 1e-9
        if norm == "l2":
            res = so.minimize(lambda v: v @ v, np.zeros(dim), jac=lambda v: 2 * v, method="SLSQP",
                              constraints=[{"type": "eq", "fun": lambda v: wi @ v - ri}],
                              bounds=list(zip(li, hi_i)), options={"ftol": 1e-14, "maxiter": 500})
            ref, got = float(np.sqrt(res.fun)), float(np.linalg.norm(di))
        elif norm == "l1":  # d = p - m with p, m >= 0
            res = so.linprog(np.ones(2 * dim), A_eq=np.concatenate([wi, -wi])[None], b_eq=[ri],
                             bounds=[(0, h) for h in hi_i] + [(0, -lv) for lv in li])
            ref, got = float(res.fun), float(np.abs(di).sum())
        else:  # minimize s with -s <= d_i <= s
            a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
            res = so.linprog(np.r_[np.zeros(dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                             A_eq=np.r_[wi, 0.0][None], b_eq=[ri], bounds=list(zip(li, hi_i)) + [(0, None)])
            ref, got = float(res.fun), float(np.abs(di).max())
        assert got <= ref + 1e-7, (i, got, ref)
    assert feasible > n // 2


# ---------------------------------------------------------------------- a linear model: exact answers


@pytest.fixture(scope="module")
def linear():
    """A linear classifier on 8x8 inputs near 0.5, labels = its predictions, and per norm the
    smallest misclassifying distance min_j (z_y - z_j) / ||w_y - w_j||_dual, for samples whose
    optimal perturbation stays inside the box (so the box constraint is not active)."""
    g = gen(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    with torch.no_grad():
        weight = torch.randn(10, 64, generator=g, dtype=torch.float64)
        weight[:, :3] *= 8  # a few strong pixels, so the L1 optimum (one pixel) fits in the box too
        model[1].weight.copy_(weight)
        model[1].bias.zero_()
    x = (0.5 + 0.03 * torch.randn(50, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = predict(model, x)
    with torch.no_grad():
        z = model(x)
    rows = torch.arange(len(y))
    wd = weight.unsqueeze(0) - weight[y].unsqueeze(1)  # (N, K, D): w_j - w_y
    margin = z[rows, y].unsqueeze(1) - z  # z_y - z_j
    optimum = {}
    for norm, dual in (("l2", 2), ("linf", 1), ("l1", float("inf"))):
        dist = (margin / wd.norm(p=dual, dim=2)).scatter(1, y.unsqueeze(1), float("inf"))
        best, j = dist.min(dim=1)
        w = wd[rows, j]
        if norm == "l2":
            delta = best.unsqueeze(1) * w / w.norm(dim=1, keepdim=True)
        elif norm == "linf":
            delta = best.unsqueeze(1) * w.sign()
        else:
            k = w.abs().argmax(dim=1)
            delta = torch.zeros_like(w)
            delta[rows, k] = best * w[rows, k].sign()
        point = x.flatten(1) + delta
        free = ((point >= 0) & (point <= 1)).all(dim=1)
        assert int(free.sum()) >= 45
        assert bool((predict(model, (x.flatten(1) + 1.001 * delta).view_as(x)) != y).all())
        optimum[norm] = (best, free)
    return model, x, y, optimum


@pytest.mark.parametrize(
    "name,norm,params,worst,typical",
    [
        ("deepfool", "l2", {}, 1.03, 1.025),
        ("deepfool", "linf", {}, 1.03, 1.025),
        ("fab-min", "l2", {"steps": 20}, 1.01, 1.002),
        ("fab-min", "linf", {"steps": 20}, 1.01, 1.002),
        ("fab-min", "l1", {"steps": 20}, 1.01, 1.002),
        ("fab-t-min", "l2", {"steps": 20}, 1.01, 1.002),
        ("cw", "l2", {}, 1.10, 1.01),
        ("ead", "l1", {}, 1.20, 1.01),
    ],
)
def test_linear_model_smallest_perturbation(linear, name, norm, params, worst, typical):
    model, x, y, optimum = linear
    best, free = optimum[norm]
    threat = ThreatModel(norm, 1.0)
    result = create_attack(name, threat, **params).run(model, x, y, gen())
    assert bool(result.success.all())
    assert torch.equal(predict(model, result.x_adv) != y, result.success)
    ratio = (threat.distance(result.x_adv, x) / best)[free]
    assert float(ratio.min()) >= 1 - 1e-6  # nothing beats the optimum
    assert float(ratio.max()) <= worst, float(ratio.max())
    assert float(ratio.median()) <= typical, float(ratio.median())


# ---------------------------------------------------------------------- the digits CNN


@pytest.mark.parametrize(
    "name,norm",
    [("fab-min", "linf"), ("fab-min", "l2"), ("fab-min", "l1"), ("fab-t-min", "linf"), ("deepfool", "l2"),
     ("deepfool", "linf"), ("cw", "l2"), ("ead", "l1")],
)
def test_minimum_norm_results_are_valid(cnn, name, norm):
    model, x, y = cnn
    x_before = x.clone()
    attack = create_attack(name, ThreatModel(norm, EPS[norm]), **FAST[name])
    assert attack.minimum_norm
    result = attack.run(model, x, y, gen())
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
    # success means misclassified (wherever the point lies), checked by a fresh full-batch forward.
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    assert result.success.float().mean() >= 0.9
    # Samples without an adversarial come back unchanged.
    assert torch.equal(result.x_adv[~result.success], x[~result.success])
    for counts in (result.gradients, result.forwards):
        assert counts.dtype == torch.long and counts.shape == (len(y),)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_min_distances_match_pgd(cnn, norm):
    """At each eps, FAB-min breaks at least as many points as PGD (its distances are at least as small
    as what PGD needs), and the distances are real: of the points FAB-min breaks at d <= eps / 1.1,
    PGD at eps breaks most."""
    model, x, y = cnn
    correct = predict(model, x) == y
    fab = create_attack("fab-min", ThreatModel(norm, EPS[norm]), **FAST["fab-min"]).run(model, x, y, gen())
    dist = ThreatModel(norm, 1.0).distance(fab.x_adv, x).masked_fill(~fab.success, float("inf"))
    for frac in (0.3, 0.6, 1.0):
        eps = frac * EPS[norm]
        pgd = create_attack("pgd", ThreatModel(norm, eps), steps=40).run(model, x, y, gen(1))
        fab_broken = correct & (dist <= eps)
        assert int(fab_broken.sum()) >= int((correct & pgd.success).sum()) - 1, (eps, int(fab_broken.sum()))
        clearly = correct & (dist <= eps / 1.1)
        if int(clearly.sum()) >= 5:
            assert float(pgd.success[clearly].float().mean()) >= 0.8, eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fixed_budget_fab_inside_the_ball_and_agrees_with_fab_min(cnn, norm):
    """fab at eps stops each sample at its first misclassified point within eps; with the same steps
    and no random restart its trajectory is FAB-min's, so it breaks every point FAB-min finds within
    eps (and possibly more, from the final projection of points found outside)."""
    model, x, y = cnn
    threat = ThreatModel(norm, 0.6 * EPS[norm])
    fab = create_attack("fab", threat, **FAST["fab"]).run(model, x, y, gen())
    assert bool(threat.contains(fab.x_adv, x, tol=0).all())
    assert torch.equal(fab.success, predict(model, fab.x_adv) != y)
    fmin = create_attack("fab-min", threat, line_search=0, **FAST["fab"]).run(model, x, y, gen())
    within = fmin.success & (threat.distance(fmin.x_adv, x) <= threat.eps)
    assert 0 < int(within.sum()) < len(y)
    assert bool((fab.success | ~within).all())
    # Early stopping: fixed-budget FAB spends no more than FAB-min on any sample.
    assert bool((fab.gradients <= fmin.gradients).all())
    assert int(fab.gradients.sum()) < int(fmin.gradients.sum())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_at_least_as_strong_as_fab(cnn, norm):
    model, x, y = cnn
    threat = ThreatModel(norm, 0.5 * EPS[norm])
    fab = create_attack("fab", threat, **FAST["fab"]).run(model, x, y, gen())
    fab_t = create_attack("fab-t", threat, steps=15, n_target_classes=9).run(model, x, y, gen())
    assert bool(threat.contains(fab_t.x_adv, x, tol=0).all())
    assert torch.equal(fab_t.success, predict(model, fab_t.x_adv) != y)
    assert int(fab_t.success.sum()) >= int(fab.success.sum())
    assert 0 < int(fab.success.sum()) < len(y)


def test_fixed_budget_fab_at_eps_zero(cnn):
    model, x, y = cnn
    wrong = predict(model, x) != y
    result = create_attack("fab", ThreatModel("linf", 0.0), steps=5).run(model, x, y, gen())
    assert torch.equal(result.x_adv, x)
    assert torch.equal(result.success, wrong)
    assert int(result.gradients.sum()) == 0


# ---------------------------------------------------------------------- exact counts


class _Counting(nn.Module):
    """Wraps a model and counts the samples it sees: in forward passes, and in input gradients
    (vector-Jacobian products reaching the input, one per sample each)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0
        self.grad_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        if x.requires_grad:
            x.register_hook(self._count)
        return self.model(x)

    def _count(self, grad: torch.Tensor) -> None:
        self.grad_rows += grad.shape[0]


@pytest.mark.parametrize(
    "name,norm,params",
    [
        ("fab-min", "linf", {"steps": 8, "restarts": 2}),
        ("fab-t-min", "l2", {"steps": 5, "n_target_classes": 3}),
        ("fab", "linf", {"steps": 8, "restarts": 2}),
        ("fab-t", "l2", {"steps": 6, "n_target_classes": 3}),
        ("deepfool", "linf", {}),
        ("cw", "l2", {"steps": 12, "binary_steps": 3}),
        ("ead", "l1", {"steps": 12, "binary_steps": 3}),
        ("ead", "l1", {"steps": 12, "binary_steps": 3, "fista": False}),
    ],
)
def test_counts_add_up_to_the_work_done(cnn, name, norm, params):
    """Summed over samples, the reported counts are exactly the samples the model processed in
    forward passes and in input gradients."""
    model, x, y = cnn
    counting = _Counting(model)
    res = create_attack(name, ThreatModel(norm, 0.5 * EPS[norm]), **params).run(counting, x, y, gen())
    assert int(res.forwards.sum()) == counting.rows
    assert int(res.gradients.sum()) == counting.grad_rows
    assert bool((res.forwards >= 1).all())


def test_fab_counts(cnn):
    model, x, y = cnn
    k = 9  # other classes of the 10-class model
    wrong = predict(model, x) != y
    steps, restarts, line = 6, 2, 4
    res = create_attack("fab-min", ThreatModel("l2", 1.0), steps=steps, restarts=restarts, line_search=line).run(
        model, x, y, gen())
    # Misclassified points cost the clean forward pass only.
    assert bool((res.gradients[wrong] == 0).all()) and bool((res.forwards[wrong] == 1).all())
    assert bool((res.gradients[~wrong] == restarts * steps * k).all())
    # Forward passes: the clean batch, (steps + 1) per run, one more on each step where some samples
    # moved back after a success, and the line search of the samples found.
    low = 1 + restarts * (steps + 1) + line * res.success.long()
    assert bool((res.forwards[~wrong] >= low[~wrong]).all())
    assert bool((res.forwards[~wrong] <= (low + restarts * steps)[~wrong]).all())

    threat = ThreatModel("linf", 0.04)
    fixed = create_attack("fab", threat, steps=steps, restarts=restarts).run(model, x, y, gen())
    robust = ~fixed.success
    assert int(robust.sum()) > 0 and int((fixed.success & ~wrong).sum()) > 0
    assert bool((fixed.gradients[robust] == restarts * steps * k).all())
    assert bool((fixed.gradients % k == 0).all()) and bool((fixed.gradients <= restarts * steps * k).all())
    assert bool((fixed.gradients[wrong] == 0).all())

    targeted = create_attack("fab-t", threat, steps=steps, n_target_classes=3).run(model, x, y, gen())
    robust = ~targeted.success
    assert int(robust.sum()) > 0
    assert bool((targeted.gradients[robust] == 3 * steps).all())
    assert bool((targeted.gradients[wrong] == 0).all())


def test_deepfool_counts_match_single_sample_runs(cnn):
    """A sample first misclassified at iterate j costs exactly (candidates - 1) * j gradients, in a
    batch as alone; alone it costs j + 1 forward passes, in a batch at most j more (one forward pass
    again on the survivors whenever others finish)."""
    model, x, y = cnn
    attack = create_attack("deepfool", ThreatModel("l2", 1.0), candidates=4)
    batch = attack.run(model, x, y)
    for i in range(0, len(y), 3):
        alone = attack.run(model, x[i : i + 1], y[i : i + 1])
        assert bool(alone.success[0]) == bool(batch.success[i])
        assert int(batch.gradients[i]) == int(alone.gradients[0])
        j = int(alone.gradients[0]) // 3
        assert int(alone.forwards[0]) == j + 1
        assert j + 1 <= int(batch.forwards[i]) <= 2 * j + 1
        torch.testing.assert_close(batch.x_adv[i], alone.x_adv[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name,fista", [("cw", None), ("ead", True), ("ead", False)])
def test_cw_and_ead_counts(cnn, name, fista):
    model, x, y = cnn
    steps, rounds = 7, 3
    norm = "l2" if name == "cw" else "l1"
    params = {"steps": steps, "binary_steps": rounds, "abort_early": False, "line_search": 0, "lr": 0.1}
    if fista is not None:
        params["fista"] = fista
    res = create_attack(name, ThreatModel(norm, 1.0), **params).run(model, x, y)
    wrong = predict(model, x) != y
    full = ~wrong
    assert bool((res.gradients[full] == rounds * steps).all())
    if name == "cw":
        assert torch.equal(res.forwards, res.gradients)
    elif fista:  # the gradient is taken at the momentum point, the iterate checked by another pass
        assert torch.equal(res.forwards[full], 2 * res.gradients[full])
    else:  # the gradient's pass checks the iterate; one more pass per round for the last iterate
        assert bool((res.forwards[full] == rounds * (steps + 1)).all())
    # Misclassified from the start: found by the first pass, never attacked again.
    assert bool((res.gradients[wrong] == 1).all()) and bool((res.forwards[wrong] == 1).all())
    # The final bisection costs one forward pass per step on each sample found at a distance > 0.
    assert int((res.success & full).sum()) > 10
    line = create_attack(name, ThreatModel(norm, 1.0), **{**params, "line_search": 5}).run(model, x, y)
    assert torch.equal(line.gradients, res.gradients)
    assert torch.equal(line.forwards, res.forwards + 5 * (res.success & full).long())
    unit = ThreatModel(norm, 1.0)
    assert bool((unit.distance(line.x_adv, x) <= unit.distance(res.x_adv, x)).all())
    # With abort_early, samples leave the inner loop early: fewer gradients, never more.
    early = create_attack(name, unit, **{**params, "abort_early": True, "steps": 30}).run(model, x, y)
    assert bool((early.gradients <= rounds * 30).all()) and int(early.gradients.sum()) < rounds * 30 * len(y)


# ---------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", MIN_NORM + ("fab", "fab-t"))
def test_model_untouched(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(32, 10))
    model.train()
    model[4].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(12, 1, 8, 8, generator=gen(5))
    y = torch.randint(0, 10, (12,), generator=gen(6))
    norm = {"cw": "l2", "ead": "l1"}.get(name, "l2")
    params = {**FAST[name], "steps": 3}
    if name in ("cw", "ead"):
        params["binary_steps"] = 2
    with torch.no_grad():  # input gradients are still taken
        result = create_attack(name, ThreatModel(norm, 0.5), **params).run(model, x, y, gen())
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert torch.equal(result.success, predict(model, result.x_adv) != y)


def test_reproducible_from_the_generator(cnn):
    model, x, y = cnn
    attack = create_attack("fab-min", ThreatModel("linf", 0.1), steps=5, restarts=2)
    a, b = attack.run(model, x, y, gen(4)), attack.run(model, x, y, gen(4))
    c = attack.run(model, x, y, gen(5))
    for field in ("x_adv", "success", "gradients", "forwards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.x_adv, c.x_adv)


def test_registry():
    names = set(ATTACKS.names())
    assert {"fab", "fab-t", "fab-min", "fab-t-min", "deepfool", "cw", "ead"} <= names
    linf = ThreatModel("linf", 0.1)
    assert not create_attack("fab", linf).minimum_norm and not create_attack("fab-t", linf).minimum_norm
    assert create_attack("fab-t", linf).params == {
        "steps": 100, "restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "n_target_classes": 9}
    assert create_attack("cw", ThreatModel("l2", 1.0)).params["binary_steps"] == 9
    assert create_attack("ead", ThreatModel("l1", 1.0)).params["decision_rule"] == "l1"
    for name in MIN_NORM:
        norm = {"cw": "l2", "ead": "l1"}.get(name, "l2")
        assert ATTACKS.get(name).minimum_norm and create_attack(name, ThreatModel(norm, 1.0)).minimum_norm
    # CW-Linf is PGD on the CW margin.
    assert create_attack("pgd", linf, loss="cw").params["loss"] == "cw"


@pytest.mark.parametrize(
    "name,norm,params,targeted",
    [
        ("fab", "linf", {"alpha_max": 1.5}, False),
        ("fab", "linf", {"beta": 0.0}, False),
        ("fab", "linf", {"eta": 0.0}, False),
        ("fab", "linf", {"steps": 0}, False),
        ("fab", "linf", {"restarts": 0}, False),
        ("fab", "linf", {"n_target_classes": 3}, False),
        ("fab", "linf", {}, True),
        ("fab-t", "l2", {"n_target_classes": 0}, False),
        ("fab-min", "l2", {"line_search": -1}, False),
        ("deepfool", "l1", {}, False),
        ("deepfool", "l2", {"overshoot": -0.1}, False),
        ("deepfool", "l2", {"candidates": 1}, False),
        ("deepfool", "l2", {}, True),
        ("cw", "linf", {}, False),
        ("cw", "l2", {"binary_steps": 0}, False),
        ("cw", "l2", {"lr": 0.0}, False),
        ("cw", "l2", {"confidence": -1.0}, False),
        ("cw", "l2", {"initial_const": 0.0}, False),
        ("ead", "l2", {}, False),
        ("ead", "l1", {"decision_rule": "l2"}, False),
        ("ead", "l1", {"beta": -1e-3}, False),
        ("ead", "l1", {"fista": "maybe"}, False),
    ],
)
def test_bad_params_raise(name, norm, params, targeted):
    with pytest.raises(RobustlabError):
        create_attack(name, ThreatModel(norm, 0.1), targeted=targeted, **params)


def test_targeted_cw_and_ead_hit_their_targets(cnn):
    model, x, y = cnn
    targets = (y + 1 + torch.randint(0, 9, y.shape, generator=gen(2))) % 10
    for name, norm in (("cw", "l2"), ("ead", "l1")):
        params = {**FAST[name], "binary_steps": 5, "steps": 30, "lr": 0.1}
        res = create_attack(name, ThreatModel(norm, 1.0), targeted=True, **params).run(model, x, targets)
        assert torch.equal(res.success, predict(model, res.x_adv) == targets)
        assert res.success.float().mean() >= 0.75, name  # chance: 0.1
