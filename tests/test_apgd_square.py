"""APGD (CE, DLR, targeted DLR; Linf, L2, L1) and the Square attack (Linf, L2) on a small CNN
trained here on sklearn digits.

What is checked: the step-size checkpoints and the square-size schedule are the published ones;
adversarial examples stay in the threat model and the success flags are what the model predicts;
per-sample gradient and query counts are exact (a model wrapper counts every call per sample
independently of the attack's bookkeeping); APGD-CE is at least as strong as PGD at equal steps and
APGD-T at least as strong as APGD-DLR; Square gets stronger with more queries and breaks a model that
masks its gradients, where gradient attacks fail; results are reproducible from the generator; bad
parameters raise RobustlabError.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS, create_attack
from robustlab.attacks.apgd import checkpoints, l1_checkpoints
from robustlab.attacks.square import SCHEDULE, square_fraction, square_pattern, square_sizes
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel
from helpers import Recorder, gen, predict, robust_fraction, separated

APGD = ("apgd-ce", "apgd-dlr", "apgd-t")
EPS = {"linf": 0.1, "l2": 0.7, "l1": 1.5}


def _fast(name: str, **params):
    """Small budgets for the checks that do not depend on them."""
    if name == "square":
        return {"queries": 100, **params}
    return {"steps": 10, **({"n_target_classes": 3} if name == "apgd-t" else {}), **params}


# ---------------------------------------------------------------------- the published schedules


def test_checkpoints_are_the_published_ones():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [1]
    # Independently, with exact rational arithmetic: w_j = ceil(p_j * N) for p_0 = 0, p_1 = 0.22,
    # p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), every p_j <= 1, duplicates dropped.
    for steps in list(range(1, 60)) + [100, 150, 250, 1000]:
        ps, prev, cur = [], Fraction(0), Fraction(22, 100)
        while cur <= 1:
            ps.append(cur)
            prev, cur = cur, cur + max(cur - prev - Fraction(3, 100), Fraction(6, 100))
        expected = sorted({math.ceil(p * steps) for p in ps} - {0})
        assert checkpoints(steps) == expected, steps
    with pytest.raises(RobustlabError):
        checkpoints(0)
    # APGD-L1 adapts every 4% of the iterations.
    assert l1_checkpoints(100) == list(range(4, 100, 4)) and l1_checkpoints(10) == list(range(1, 10))


def test_square_schedule_is_the_published_one():
    p = 0.8
    # On a 10,000-query budget p halves after iterations 10, 50, 200, ..., 8000.
    assert square_fraction(0, 10000, p) == p and square_fraction(10, 10000, p) == p
    for halvings, t in enumerate(SCHEDULE, start=1):
        assert square_fraction(t, 10000, p) == p / 2 ** (halvings - 1)
        assert square_fraction(t + 1, 10000, p) == p / 2**halvings
    assert SCHEDULE == (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    # Rescaled to the budget: with 1000 queries the first halving comes after iteration 1.
    assert square_fraction(1, 1000, p) == p and square_fraction(2, 1000, p) == p / 2
    assert square_fraction(999, 1000, p) == p / 512
    linf = square_sizes(5000, p, 28, 28, "linf")
    assert len(linf) == 4999 and linf[0] == round(math.sqrt(0.8 * 784)) and linf[-1] == 1
    assert all(a >= b for a, b in zip(linf, linf[1:]))
    l2 = square_sizes(5000, p, 32, 32, "l2")
    assert all(s >= 3 and s % 2 == 1 for s in l2) and l2[-1] == 3
    assert max(square_sizes(100, 1.0, 5, 9, "linf")) <= 5
    # The L2 pattern: unit norm, opposite signs in the two halves, peaks at the centre of each half.
    pat = square_pattern(7)
    assert float(pat.norm()) == pytest.approx(1.0)
    assert bool((pat[:3] > 0).all()) and bool((pat[3:] < 0).all())
    assert pat[1].argmax() == 3 and pat[:3, 3].argmax() == 1


# ---------------------------------------------------------------------- validity of the results


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", APGD + ("square",))
def test_results_inside_threat_model_and_flags_are_true(digits, name, norm):
    if name == "square" and norm == "l1":
        pytest.skip("Square has no L1 version")
    model, x, y = digits
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])
    result = create_attack(name, threat, **_fast(name)).run(model, x, y, gen())
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype and not result.x_adv.requires_grad
    # Inside with no tolerance at all, and exactly the points the attack evaluated: the contract's
    # final projection leaves them bit for bit.
    assert bool(threat.contains(result.x_adv, x, tol=0.0).all())
    assert torch.equal(threat.project(result.x_adv, x), result.x_adv)
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    for counts in (result.gradients, result.forwards):
        assert counts.dtype == torch.long and counts.shape == (len(y),)
    assert bool((result.forwards >= result.gradients).all()) and bool((result.forwards >= 1).all())
    if name == "square":
        assert bool((result.gradients == 0).all())
    assert result.success.float().mean() > 0.1  # the attack found something
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("name", APGD + ("square",))
def test_eps_zero_gives_the_clean_points(digits, name):
    model, x, y = digits
    for norm in ("linf", "l2", "l1") if name != "square" else ("linf", "l2"):
        result = create_attack(name, ThreatModel(norm, 0.0), **_fast(name)).run(model, x, y, gen())
        assert torch.equal(result.x_adv, x)
        assert torch.equal(result.success, predict(model, x) != y)


def test_square_linf_moves_every_pixel_to_a_vertex(digits):
    """Linf Square searches the vertices of the ball (clipped to the box): every coordinate of its
    points is x + eps or x - eps, unless the box cut it off."""
    model, x, y = digits
    threat = ThreatModel("linf", 0.1)
    result = create_attack("square", threat, queries=100).run(model, x, y, gen())
    delta = result.x_adv - x
    vertex = torch.isclose(delta.abs(), torch.tensor(0.1), atol=1e-6)
    clipped = (result.x_adv == 0) | (result.x_adv == 1)
    assert bool((vertex | clipped).all())


# ---------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", APGD)
def test_apgd_counts_are_exact(digits_model, digits_test, name, norm):
    """Per sample, the gradients and forwards the attack reports are what the model saw; an
    unbroken sample costs steps gradients and steps + 1 forwards per run (APGD-T: plus one clean
    forward); a broken one keeps the first point the model misclassified."""
    threat = ThreatModel(norm, EPS[norm])
    keep = separated(digits_test.x, threat, 100)
    x, y = digits_test.x[keep], digits_test.y[keep]
    steps, restarts, targets = 6, 2, 2
    params = {"steps": steps, "restarts": restarts}
    if name == "apgd-t":
        params["n_target_classes"] = targets
    rec = Recorder(digits_model, x, y, threat)
    result = create_attack(name, threat, **params).run(rec, x, y, gen())
    assert torch.equal(result.forwards, rec.forwards)
    assert torch.equal(result.gradients, rec.gradients)
    runs = restarts * (targets if name == "apgd-t" else 1)
    clean = 1 if name == "apgd-t" else 0
    robust = ~result.success
    assert int(robust.sum()) > 0 and int(result.success.sum()) > 0
    assert bool((result.gradients[robust] == runs * steps).all())
    assert bool((result.forwards[robust] == runs * (steps + 1) + clean).all())
    # Broken samples stop at the first misclassifying forward and return that very point.
    broken = result.success.nonzero(as_tuple=True)[0]
    assert torch.equal(result.forwards[broken], rec.first_wrong[broken])
    for i in broken.tolist():
        assert torch.equal(result.x_adv[i], rec.queried[(i, int(rec.first_wrong[i]))])
    if name == "apgd-t":  # already misclassified clean points cost one forward and stay as they are
        wrong = predict(digits_model, x) != y
        assert int(wrong.sum()) > 0
        assert bool((result.forwards[wrong] == 1).all()) and bool((result.gradients[wrong] == 0).all())
        assert torch.equal(result.x_adv[wrong], x[wrong])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_query_counts_are_exact(digits_model, digits_test, norm):
    """A sample broken at query q has forwards == q and that query's point; an unbroken one spent
    the whole budget; gradients are never taken."""
    threat = ThreatModel(norm, EPS[norm])
    keep = separated(digits_test.x, threat, 100)
    x, y = digits_test.x[keep], digits_test.y[keep]
    queries = 150
    rec = Recorder(digits_model, x, y, threat)
    result = create_attack("square", threat, queries=queries).run(rec, x, y, gen())
    assert torch.equal(result.forwards, rec.forwards)
    assert bool((rec.gradients == 0).all()) and bool((result.gradients == 0).all())
    robust = ~result.success
    assert int(robust.sum()) > 0 and int(result.success.sum()) > 10
    assert bool((result.forwards[robust] == queries).all())
    assert bool((rec.first_wrong[robust] == -1).all())
    broken = result.success.nonzero(as_tuple=True)[0]
    assert torch.equal(result.forwards[broken], rec.first_wrong[broken])
    assert int((result.forwards[broken] > 1).sum()) > 5  # not only the initial query breaks samples
    for i in broken.tolist():
        assert torch.equal(result.x_adv[i], rec.queried[(i, int(rec.first_wrong[i]))])


def test_apgd_eot_counts_every_pass(digits):
    """With eot=k every evaluation averages k passes, and all of them are counted."""
    model, x, y = digits
    x, y = x[:60], y[:60]

    class Noisy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner((z + 0.02 * torch.randn_like(z)).clamp(0, 1))

    torch.manual_seed(0)
    result = create_attack("apgd-ce", ThreatModel("linf", 0.05), steps=4, eot=3).run(Noisy(model), x, y, gen())
    robust = ~result.success
    assert int(robust.sum()) > 0
    assert bool((result.gradients[robust] == 12).all()) and bool((result.forwards[robust] == 15).all())
    assert bool((result.gradients % 3 == 0).all()) and bool((result.forwards % 3 == 0).all())


# ---------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_apgd_ce_at_least_as_strong_as_pgd(digits_model, digits_test, norm):
    x, y = digits_test.x, digits_test.y
    threat = ThreatModel(norm, {"linf": 0.1, "l2": 0.5, "l1": 1.5}[norm])
    slack = 2 / len(y)
    for seed in (0, 1):
        pgd = robust_fraction(create_attack("pgd", threat, steps=20).run(digits_model, x, y, gen(seed)))
        apgd = robust_fraction(create_attack("apgd-ce", threat, steps=20).run(digits_model, x, y, gen(seed)))
        assert apgd <= pgd + slack, (seed, apgd, pgd)


def test_apgd_t_at_least_as_strong_as_apgd_dlr(digits):
    model, x, y = digits
    x, y = x[:100], y[:100]
    for norm in ("linf", "l2"):
        threat = ThreatModel(norm, EPS[norm])
        dlr = create_attack("apgd-dlr", threat, steps=20).run(model, x, y, gen())
        targeted = create_attack("apgd-t", threat, steps=20, n_target_classes=9).run(model, x, y, gen())
        assert robust_fraction(targeted) <= robust_fraction(dlr) + 1 / len(y), norm


def test_restarts_only_add_successes(digits):
    model, x, y = digits
    threat = ThreatModel("linf", 0.07)
    one = create_attack("apgd-ce", threat, steps=5).run(model, x, y, gen(3))
    three = create_attack("apgd-ce", threat, steps=5, restarts=3).run(model, x, y, gen(3))
    assert bool((three.success | ~one.success).all())
    assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
    assert int(three.success.sum()) >= int(one.success.sum())


def test_square_gets_stronger_with_more_queries(digits):
    model, x, y = digits
    x, y = x[:80], y[:80]
    for norm in ("linf", "l2"):
        threat = ThreatModel(norm, EPS[norm])
        accs = [robust_fraction(create_attack("square", threat, queries=q).run(model, x, y, gen())) for q in (4, 40, 400)]
        assert accs[0] >= accs[1] >= accs[2] and accs[2] < accs[0] - 0.1, (norm, accs)


def test_square_breaks_a_gradient_masking_model(digits):
    """A model that rounds its input to 4 grey levels has zero input gradients: gradient attacks do
    no better than their random start, while Square, which only needs the scores, breaks it."""
    model, x, y = digits

    class Quantized(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(torch.round(z * 3) / 3)

    masked = Quantized(model)
    clean = float((predict(masked, x) == y).float().mean())
    assert clean > 0.8
    threat = ThreatModel("linf", 0.2)
    apgd = robust_fraction(create_attack("apgd-ce", threat, steps=20).run(masked, x, y, gen()))
    square = robust_fraction(create_attack("square", threat, queries=300).run(masked, x, y, gen()))
    assert apgd > clean - 0.25, (apgd, clean)
    assert square < apgd - 0.3, (square, apgd)


def test_targeted_apgd_and_square_hit_their_targets(digits):
    model, x, y = digits
    targets = (y + torch.randint(1, 10, y.shape, generator=gen(1))) % 10
    threat = ThreatModel("linf", 0.3)
    for name, params in (("apgd-ce", {"steps": 20}), ("apgd-dlr", {"steps": 20}), ("square", {"queries": 300})):
        result = create_attack(name, threat, targeted=True, **params).run(model, x, targets, gen())
        assert torch.equal(result.success, predict(model, result.x_adv) == targets)
        assert result.success.float().mean() > 0.6, name


# ---------------------------------------------------------------------- the model, reproducibility


@pytest.mark.parametrize("name", ["apgd-ce", "square"])
def test_model_untouched(digits, name):
    model, x, y = digits
    model = copy.deepcopy(model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    create_attack(name, ThreatModel("linf", 0.1), **_fast(name)).run(model, x, y, gen())
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", APGD + ("square",))
def test_reproducible_from_the_generator(digits, name, norm):
    if name == "square" and norm == "l1":
        pytest.skip("Square has no L1 version")
    model, x, y = digits
    x, y = x[:60], y[:60]
    attack = create_attack(name, ThreatModel(norm, EPS[norm]), **_fast(name))
    a, b, c = (attack.run(model, x, y, gen(s)) for s in (5, 5, 6))
    for field in ("x_adv", "success", "gradients", "forwards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.x_adv, c.x_adv)
    cfg = attack.config()
    rebuilt = create_attack(cfg["name"], ThreatModel(**cfg["threat"]), cfg["targeted"], **cfg["params"])
    assert torch.equal(rebuilt.run(model, x, y, gen(5)).x_adv, a.x_adv)


# ---------------------------------------------------------------------- registry and bad input


def test_registry_and_defaults():
    assert {"apgd-ce", "apgd-dlr", "apgd-t", "square"} <= set(ATTACKS.names())
    threat = ThreatModel("linf", 8 / 255)
    apgd = create_attack("apgd-ce", threat)
    assert apgd.params == {"steps": 100, "restarts": 1, "eot": 1, "rho": 0.75} and apgd.kind == "white-box"
    assert create_attack("apgd-t", threat).params["n_target_classes"] == 9
    square = create_attack("square", threat)
    assert square.params == {"queries": 5000, "p_init": 0.8, "restarts": 1, "rescale_schedule": True}
    assert square.kind == "score-based"
    assert create_attack("square", threat).config()["kind"] == "score-based"


@pytest.mark.parametrize(
    "name,params",
    [
        ("apgd-ce", {"steps": 0}),
        ("apgd-ce", {"restarts": 0}),
        ("apgd-ce", {"eot": 0}),
        ("apgd-ce", {"rho": 0.0}),
        ("apgd-ce", {"rho": 1.5}),
        ("apgd-ce", {"loss": "cw"}),
        ("apgd-dlr", {"steps": 2.5}),
        ("apgd-t", {"n_target_classes": 0}),
        ("apgd-t", {"steps": "many"}),
        ("square", {"queries": 0}),
        ("square", {"p_init": 0.0}),
        ("square", {"p_init": 1.5}),
        ("square", {"restarts": 0}),
        ("square", {"steps": 10}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(RobustlabError):
        create_attack(name, ThreatModel("linf", 0.1), **params)


def test_bad_setups_raise(digits):
    model, x, y = digits
    with pytest.raises(RobustlabError):
        create_attack("square", ThreatModel("l1", 1.0))
    with pytest.raises(RobustlabError):
        create_attack("apgd-t", ThreatModel("linf", 0.1), targeted=True)
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(RobustlabError):  # untargeted DLR needs 3 classes: fine; targeted DLR needs 4
        create_attack("apgd-t", ThreatModel("linf", 0.1), steps=2).run(three, x[:5], y[:5] % 3)
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(RobustlabError):
        create_attack("apgd-dlr", ThreatModel("linf", 0.1), steps=2).run(two, x[:5], y[:5] % 2)
    with pytest.raises(RobustlabError):
        create_attack("square", ThreatModel("linf", 0.1), queries=5).run(model, x * 2, y)
    with pytest.raises(RobustlabError):
        create_attack("square", ThreatModel("linf", 0.1), queries=5).run(nn.Flatten(0), x, y)  # not (N, K)
