"""Gradient attacks (FGSM, BIM, PGD, MI-FGSM) on a small real model trained here on sklearn digits.

What is checked: adversarial examples stay in the threat model; success flags are what the model
really predicts; robust accuracy behaves as it must (falls with eps, equals clean accuracy at eps=0,
reaches ~0 at a huge eps, PGD beats FGSM, restarts never hurt, targeted attacks hit their targets);
the model is never changed; per-sample gradient counts reflect early stopping exactly; results are
reproducible from the generator; the registry and the spec parser reject bad input clearly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks import ATTACKS, create_attack
from robustlab.errors import RobustlabError
from robustlab.params import parse_spec
from robustlab.threat import NORMS, ThreatModel
from helpers import gen, predict, robust_fraction

ITERATIVE = ("bim", "pgd", "mifgsm")
ALL = ("fgsm",) + ITERATIVE
# A moderate and a huge radius for each norm on 8x8 images with values in [0, 1] (64 pixels).
MID_EPS = {"linf": 0.1, "l2": 1.0, "l1": 4.0}
HUGE_EPS = {"linf": 1.0, "l2": 8.0, "l1": 64.0}


def _digits_mlp() -> nn.Module:
    # Batch norm and dropout on purpose: attacks must run them in eval mode and leave them alone.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def digits(one_thread):
    """(model in eval mode, test images (N, 1, 8, 8) in [0, 1], test labels, clean accuracy)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = _digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _epoch in range(20):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), 100):
            batch = order[i : i + 100]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    xt, yt = x[test], y[test]
    with torch.no_grad():
        clean = float((model(xt).argmax(1) == yt).float().mean())
    assert clean > 0.93, clean
    return model, xt, yt, clean


# ---------------------------------------------------------------------- validity of the results


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ALL)
def test_adversarials_inside_threat_model_and_flags_are_true(digits, name, norm):
    model, x, y, _ = digits
    x_before, y_before = x.clone(), y.clone()
    threat = ThreatModel(norm, MID_EPS[norm])
    result = create_attack(name, threat).run(model, x, y, gen())
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert not result.x_adv.requires_grad
    assert bool(threat.contains(result.x_adv, x).all())
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
    # The flags are what the model really predicts on x_adv (a fresh forward, full batch).
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    assert result.success.dtype == torch.bool and result.success.shape == (len(y),)
    for counts in (result.gradients, result.forwards):
        assert counts.dtype == torch.long and counts.shape == (len(y),)
    assert bool((result.forwards >= result.gradients).all()) and bool((result.gradients >= 1).all())
    # The attack found something: at this radius the model is far from robust.
    assert result.success.float().mean() > 0.3
    # Inputs untouched.
    assert torch.equal(x, x_before) and torch.equal(y, y_before)


@pytest.mark.parametrize("name", ALL)
def test_eps_zero_gives_clean_accuracy(digits, name):
    model, x, y, clean = digits
    for norm in NORMS:
        result = create_attack(name, ThreatModel(norm, 0.0)).run(model, x, y, gen())
        assert torch.equal(result.x_adv, x)
        assert robust_fraction(result) == pytest.approx(clean, abs=1e-9)


# ---------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm", NORMS)
def test_robust_accuracy_falls_with_eps(digits, norm):
    model, x, y, clean = digits
    huge = HUGE_EPS[norm]
    grid = [0.0] + [huge * f for f in (0.02, 0.05, 0.1, 0.2, 0.4)] + [huge]
    accs = [robust_fraction(create_attack("pgd", ThreatModel(norm, e), steps=20).run(model, x, y, gen())) for e in grid]
    assert accs[0] == pytest.approx(clean, abs=1e-9)
    slack = 2 / len(y)  # a sample or two may flip back: PGD is a heuristic, not an oracle
    for lo, hi in zip(accs, accs[1:]):
        assert hi <= lo + slack, accs
    assert accs[-1] <= 0.02, accs
    assert accs[len(accs) // 2] < clean - 0.2, accs


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_at_least_as_strong_as_fgsm(digits, norm):
    model, x, y, _ = digits
    for eps in (0.5 * MID_EPS[norm], MID_EPS[norm]):
        threat = ThreatModel(norm, eps)
        fgsm = robust_fraction(create_attack("fgsm", threat).run(model, x, y))
        pgd = robust_fraction(create_attack("pgd", threat, steps=20).run(model, x, y, gen()))
        assert pgd <= fgsm, (eps, pgd, fgsm)


@pytest.mark.parametrize("norm", NORMS)
def test_restarts_never_hurt(digits, norm):
    """With the same generator, the first restart is the single run, so every sample it breaks stays
    broken, and later restarts only add successes."""
    model, x, y, _ = digits
    threat = ThreatModel(norm, 0.6 * MID_EPS[norm])
    one = create_attack("pgd", threat, steps=5).run(model, x, y, gen(3))
    three = create_attack("pgd", threat, steps=5, restarts=3).run(model, x, y, gen(3))
    assert bool((three.success | ~one.success).all())
    assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
    assert int(three.success.sum()) >= int(one.success.sum())
    assert bool(threat.contains(three.x_adv, x).all())
    assert torch.equal(three.success, predict(model, three.x_adv) != y)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.01), ("l2", 1.0, 0.1)])
def test_pgd_not_weaker_than_torchattacks(digits, norm, eps, alpha):
    """Same model, examples, eps, step size, steps and random start: robustlab's robust accuracy is
    not above torchattacks' (averaged over seeds; it keeps the first success, so it is usually lower)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y, _ = digits
    peer_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    ours, theirs = [], []
    for seed in range(3):
        result = create_attack("pgd", ThreatModel(norm, eps), steps=10, alpha=alpha).run(model, x, y, gen(seed))
        ours.append(robust_fraction(result))
        torch.manual_seed(seed)
        x_peer = peer_cls(model, eps=eps, alpha=alpha, steps=10, random_start=True)(x, y)
        theirs.append(float((predict(model, x_peer) == y).float().mean()))
    assert sum(ours) / 3 <= sum(theirs) / 3 + 0.5 / len(y), (ours, theirs)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_targeted_attack_hits_targets(digits, name):
    model, x, y, _ = digits
    targets = (y + torch.randint(1, 10, y.shape, generator=gen(1))) % 10
    threat = ThreatModel("linf", 0.3)
    for loss in ("ce", "cw"):
        result = create_attack(name, threat, targeted=True, steps=20, loss=loss).run(model, x, targets, gen())
        assert torch.equal(result.success, predict(model, result.x_adv) == targets)
        assert result.success.float().mean() > 0.8  # chance is 0.1
        assert bool(threat.contains(result.x_adv, x).all())


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_every_loss_breaks_the_model(digits, loss):
    model, x, y, clean = digits
    result = create_attack("pgd", ThreatModel("linf", 0.15), steps=20, loss=loss).run(model, x, y, gen())
    assert robust_fraction(result) < clean - 0.5
    assert torch.equal(result.success, predict(model, result.x_adv) != y)


# ---------------------------------------------------------------------- the model is never changed


@pytest.mark.parametrize("name", ALL)
def test_model_modes_parameters_and_buffers_untouched(digits, name):
    model, x, y, _ = digits
    model = copy.deepcopy(model)
    model.train()
    model[4].eval()  # a caller's mixed modes (this dropout in eval) must be restored as they were
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = create_attack(name, ThreatModel("linf", 0.1)).run(model, x, y, gen())
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # weights and BN running stats / counters
    assert all(p.grad is None for p in model.parameters())
    # The attack ran the model in eval mode: its flags match an eval-mode forward, deterministically.
    model.eval()
    assert torch.equal(result.success, predict(model, result.x_adv) != y)


def test_frozen_parameters_and_no_grad_context(digits):
    model, x, y, _ = digits
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # gradients with respect to the input are still taken
        result = create_attack("pgd", ThreatModel("linf", 0.1)).run(model, x, y, gen())
    assert result.success.float().mean() > 0.3
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- early stopping and counts


def _first_success_step(model, threat, x, y, steps, alpha):
    """Independent reference for PGD without random start: iterate every sample for all steps and
    report the index j of the first iterate x_j (x_0 = x) that the model misclassifies (-1: none)."""
    first = torch.full((len(y),), -1, dtype=torch.long)
    iterates = []
    x_cur = x.clone()
    for j in range(steps + 1):
        iterates.append(x_cur)
        x_req = x_cur.clone().requires_grad_(True)
        logits = model(x_req)
        wrong = logits.argmax(1) != y
        first[(first < 0) & wrong] = j
        if j == steps:
            break
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_req)
        x_cur = threat.project(x_cur + threat.steepest_step(g, alpha, x_cur), x).detach()
    return first, torch.stack(iterates)


@pytest.mark.parametrize("norm", NORMS)
def test_gradient_counts_reflect_early_stopping(digits, norm):
    """A sample first misclassified at iterate j < steps costs exactly j + 1 gradients (the gradient
    at x_j is computed together with the logits that reveal the success) and j + 1 forwards; one that
    succeeds only at the final iterate costs steps gradients and steps + 1 forwards; an unbroken one
    costs steps gradients and steps + 1 forwards. float64, so the per-sample trajectories do not
    depend on which samples share the batch."""
    model, x, y, _ = digits
    model = copy.deepcopy(model).double()
    x = x.double()
    steps = 8
    threat = ThreatModel(norm, 0.5 * MID_EPS[norm])
    alpha = 2.5 * threat.eps / steps
    first, iterates = _first_success_step(model, threat, x, y, steps, alpha)
    result = create_attack("pgd", threat, steps=steps, alpha=alpha, random_start=False).run(model, x, y)
    # The mix is interesting: some samples fall early, some late, some never.
    assert int((first == 0).sum()) > 0 and int((first > 1).sum()) > 10 and int((first < 0).sum()) > 0
    assert torch.equal(result.success, first >= 0)
    found_early = (first >= 0) & (first < steps)
    expected_grads = torch.where(found_early, first + 1, torch.full_like(first, steps))
    expected_forwards = torch.where(found_early, first + 1, torch.full_like(first, steps + 1))
    assert torch.equal(result.gradients, expected_grads)
    assert torch.equal(result.forwards, expected_forwards)
    # Broken samples keep their first successful iterate.
    idx = (first >= 0).nonzero(as_tuple=True)[0]
    torch.testing.assert_close(result.x_adv[idx], iterates[first[idx], idx], atol=1e-12, rtol=0)


def test_counts_with_restarts_and_fgsm(digits):
    model, x, y, _ = digits
    steps, restarts = 4, 3
    threat = ThreatModel("linf", 0.05)
    result = create_attack("pgd", threat, steps=steps, restarts=restarts).run(model, x, y, gen())
    robust = ~result.success
    assert int(robust.sum()) > 0 and int(result.success.sum()) > 0
    assert bool((result.gradients[robust] == steps * restarts).all())
    assert bool((result.forwards[robust] == (steps + 1) * restarts).all())
    assert bool((result.gradients[result.success] <= steps * restarts).all())
    # Without a random start, misclassified clean points are found at the very first forward pass.
    wrong = predict(model, x) != y
    assert int(wrong.sum()) > 0
    plain = create_attack("pgd", threat, steps=steps, restarts=restarts, random_start=False).run(model, x, y)
    assert bool((plain.gradients[wrong] == 1).all()) and bool((plain.forwards[wrong] == 1).all())
    fgsm = create_attack("fgsm", threat).run(model, x, y)
    assert bool((fgsm.gradients == 1).all()) and bool((fgsm.forwards == 2).all())


# ---------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("norm", NORMS)
def test_reproducible_from_the_generator(digits, norm):
    model, x, y, _ = digits
    attack = create_attack("pgd", ThreatModel(norm, 0.5 * MID_EPS[norm]), steps=5, restarts=2)
    a = attack.run(model, x, y, gen(11))
    b = attack.run(model, x, y, gen(11))
    c = attack.run(model, x, y, gen(12))
    for field in ("x_adv", "success", "gradients", "forwards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.x_adv, c.x_adv)
    # Rebuilt from its JSON config, the attack gives the same result.
    cfg = attack.config()
    rebuilt = create_attack(cfg["name"], ThreatModel(**cfg["threat"]), cfg["targeted"], **cfg["params"])
    assert torch.equal(rebuilt.run(model, x, y, gen(11)).x_adv, a.x_adv)


# ---------------------------------------------------------------------- registry and parsing


def test_parse_spec():
    name, params = parse_spec("pgd:steps=40,alpha=2/255,loss=cw,random_start=false")
    assert name == "pgd"
    assert params == {"steps": 40, "alpha": pytest.approx(2 / 255), "loss": "cw", "random_start": False}
    assert isinstance(params["steps"], int)
    attack = create_attack(name, ThreatModel("linf", 8 / 255), **params)
    assert attack.params["steps"] == 40 and attack.params["loss"] == "cw"
    assert attack.params["random_start"] is False and attack.step_size() == pytest.approx(2 / 255)
    assert parse_spec(" FGSM ") == ("fgsm", {})
    assert parse_spec("pgd:alpha=0.5,steps=3,restarts=2, loss = ce")[1] == {
        "alpha": 0.5, "steps": 3, "restarts": 2, "loss": "ce"
    }
    assert parse_spec("pgd:alpha=none")[1] == {"alpha": None}


@pytest.mark.parametrize("spec", [":steps=3", "pgd:steps", "pgd:=3", "pgd:steps3"])
def test_malformed_specs_raise(spec):
    with pytest.raises(RobustlabError):
        parse_spec(spec)


def test_registry_knows_the_gradient_attacks():
    assert {"fgsm", "bim", "pgd", "mifgsm"} <= set(ATTACKS.names())
    assert create_attack("PGD", ThreatModel("l2", 0.5)).name == "pgd"
    # Defaults: PGD starts at random, BIM and MI-FGSM from the clean image with step eps / steps.
    assert create_attack("pgd", ThreatModel("linf", 0.1)).params["random_start"] is True
    bim = create_attack("bim", ThreatModel("linf", 0.1), steps=5)
    assert bim.params["random_start"] is False and bim.step_size() == pytest.approx(0.02)


@pytest.mark.parametrize(
    "name,params",
    [
        ("nosuchattack", {}),
        ("pgd", {"stepz": 10}),
        ("pgd", {"steps": 0}),
        ("pgd", {"steps": 2.5}),
        ("pgd", {"steps": "ten"}),
        ("pgd", {"restarts": 0}),
        ("pgd", {"alpha": -0.1}),
        ("pgd", {"alpha": 0.0}),
        ("pgd", {"alpha": "big"}),
        ("pgd", {"alpha": float("nan")}),
        ("pgd", {"random_start": "maybe"}),
        ("pgd", {"loss": "hinge"}),
        ("fgsm", {"loss": "mse"}),
        ("fgsm", {"steps": 10}),
        ("pgd", {"l1_sparsity": 1.0}),
        ("mifgsm", {"decay": -1.0}),
    ],
)
def test_bad_attacks_raise(name, params):
    with pytest.raises(RobustlabError):
        create_attack(name, ThreatModel("linf", 0.1), **params)


def test_bad_inputs_raise(digits):
    model, x, y, _ = digits
    attack = create_attack("pgd", ThreatModel("linf", 0.1), steps=2)
    with pytest.raises(RobustlabError):
        attack.run(model, x * 2, y)  # outside [0, 1]
    with pytest.raises(RobustlabError):
        attack.run(model, x, y[:-1])  # wrong number of labels
    with pytest.raises(RobustlabError):
        attack.run(model, x, y.float())  # float labels
    with pytest.raises(RobustlabError):
        attack.run(model, x.flatten(1), y)  # not NCHW


def test_dlr_needs_three_classes():
    two_class = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    with pytest.raises(RobustlabError):
        create_attack("pgd", ThreatModel("linf", 0.1), loss="dlr", steps=2).run(two_class, x, torch.zeros(3, dtype=torch.long))
