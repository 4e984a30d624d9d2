"""Adaptive adversarial training: MMA (shortest successful perturbations, margins up to eps_max) and
dynamic AT (PGD stopped per sample by the FOSC criterion), and the FOSC itself. Tiny models on the
embedded digits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models import create_model
from robustlab.models.runtime import eval_mode
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, fosc, inner, train
from robustlab.training.adaptive import adaptive_norm_pgd, dynamic_pgd

THREAT = ThreatModel("linf", 0.1)


@pytest.fixture(scope="module")
def batch(digits_train):
    return digits_train.x[:128], digits_train.y[:128]


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(8 * 4 * 4, 10))


# ---------------------------------------------------------------------- both recipes


@pytest.mark.parametrize("name", ["mma", "dynamic-at"])
def test_recipe_loss_is_finite_adversarial_and_decreases(name, batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("digits_cnn").train()
    obj = create_objective(name, THREAT, steps=3)
    loss, logs = obj(model, x, y, make_generator(0, 1))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert all(v.dim() == 0 and math.isfinite(float(v)) for v in logs.values())
    assert model.training
    ce = F.cross_entropy(model(x), y)
    assert abs(float(loss.detach()) - float(ce.detach())) > 1e-5  # the adversarial term is there

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(12):
        loss, _ = obj(model, x, y, make_generator(0, 1))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = float(obj(model, x, y, make_generator(0, 1))[0].detach())
    assert final < first - 1e-3, (first, final)


@pytest.mark.parametrize("name", ["mma", "dynamic-at"])
def test_inner_maximization_uses_input_gradients_only_in_eval_mode(name, batch):
    x, y = batch
    net = _bn_net().train()
    before = copy.deepcopy(net.state_dict())
    x_adv = create_objective(name, THREAT, steps=3).perturb(net, x, y, make_generator(0, 4))
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no BatchNorm drift
    assert net.training
    assert x_adv.shape == x.shape and not x_adv.requires_grad


def test_parameters_are_validated():
    assert create_objective("mma", THREAT).params == {
        "eps_max": None, "start_eps": None, "clean_weight": 1.0 / 3.0, "steps": 10, "alpha": None,
        "search_steps": 10, "random_start": True, "eps_warmup": 0.0}
    assert create_objective("dynamic-at", THREAT).params == {
        "c_max": 0.5, "dynamic_fraction": 0.8, "steps": 10, "alpha": None, "random_start": True, "eps_warmup": 0.0}
    bad = [("mma", {"eps_max": -0.1}), ("mma", {"eps_max": "big"}), ("mma", {"start_eps": 0}),
           ("mma", {"clean_weight": 1.5}), ("mma", {"search_steps": 0}), ("mma", {"steps": 0}),
           ("dynamic-at", {"c_max": -1}), ("dynamic-at", {"dynamic_fraction": 0}),
           ("dynamic-at", {"dynamic_fraction": 1.5}), ("dynamic-at", {"alpha": "x"}), ("dynamic-at", {"gamma": 1})]
    for name, params in bad:
        with pytest.raises(RobustlabError):
            create_objective(name, THREAT, **params)
    with pytest.raises(RobustlabError, match="eps_max"):
        create_objective("mma", ThreatModel("linf", 0.0))
    with pytest.raises(RobustlabError, match="needs a threat model"):
        create_objective("dynamic-at")


def test_the_loop_trains_both_and_records_their_metrics(digits_train):
    data = digits_train.subset(128)
    for name, key in (("mma", "train_margin"), ("dynamic-at", "train_fosc")):
        torch.manual_seed(0)
        h = train(create_model("digits_cnn"), data, TrainConfig(epochs=1, batch_size=64, seed=0),
                  create_objective(name, THREAT, steps=2), progress=False)
        assert math.isfinite(h[-1]["loss"]) and h[-1][key] >= 0


# ---------------------------------------------------------------------- MMA


@pytest.mark.parametrize("threat,eps_max", [(THREAT, 0.15), (ThreatModel("l2", 1.0), 1.5)])
def test_mma_margins_are_capped_in_the_box_and_misclassified(threat, eps_max, batch, digits_model):
    x, y = batch
    model = copy.deepcopy(digits_model).train()
    found = adaptive_norm_pgd(model, x, y, threat, eps_max, steps=5, generator=make_generator(0, 2))
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad(), eval_mode(model):
        correct = model(x).argmax(1) == y
        wrong_at_adv = model(found.x_adv).argmax(1) != y
    assert torch.equal(found.correct, correct) and float(correct.float().mean()) > 0.9
    assert bool(threat.with_eps(eps_max).contains(found.x_adv, x, tol=0).all())  # in the box and the eps_max ball
    assert bool((found.margin >= 0).all()) and bool((found.margin <= eps_max).all())
    b = found.broken
    assert 0.3 < float(b.float().mean()) < 1.0  # a standard model: many points broken within eps_max, not all
    assert bool(wrong_at_adv[b].all())  # the perturbation at the margin is misclassified
    assert torch.allclose(found.margin[b], threat.distance(found.x_adv, x)[b])
    assert bool((found.margin[correct & ~b] == eps_max).all())  # unbroken: margin at least eps_max
    assert bool((found.margin[~correct] == 0).all()) and torch.equal(found.x_adv[~correct], x[~correct])


def test_mma_search_is_about_as_strong_as_pgd_and_tight(batch, digits_model):
    """The margins found are short: nearly every point that PGD breaks at eps has a margin <= eps, and
    halfway to the margin along the same ray most points are still classified correctly."""
    x, y = batch
    model = digits_model
    found = adaptive_norm_pgd(model, x, y, THREAT, 0.15, steps=10, generator=make_generator(0, 2))
    x_pgd = inner.maximize(model, x, inner.cross_entropy_loss(y), THREAT, 10, 0.025, "uniform", make_generator(0, 3))
    with torch.no_grad():
        pgd_broken = (model(x).argmax(1) == y) & (model(x_pgd).argmax(1) != y)
        short = found.broken & (found.margin <= THREAT.eps + 1e-6)
        assert float((pgd_broken & ~short).float().mean()) < 0.05, "the margin search misses points PGD breaks"
        half = x + 0.5 * (found.x_adv - x)
        still_right = model(half).argmax(1) == y
    assert float(still_right[found.broken].float().mean()) > 0.8


def test_mma_clean_weight_and_warmup(batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("digits_cnn").train()
    omma = create_objective("mma", THREAT, steps=2, clean_weight=0.0)
    loss, logs = omma(model, x, y, make_generator(0, 1))
    assert math.isfinite(float(loss.detach())) and "ce" not in logs and float(logs["mma"]) == pytest.approx(float(loss.detach()))
    obj = create_objective("mma", ThreatModel("linf", 0.2), eps_warmup=0.5)
    assert obj.radii() == pytest.approx((0.2 * 1e-12 / 0.5, 0.3 * 1e-12 / 0.5))
    obj.set_progress(0, 0.25)
    assert obj.radii() == pytest.approx((0.1, 0.15))
    obj = create_objective("mma", ThreatModel("linf", 0.2), eps_max=0.1)
    assert obj.radii() == (0.1, 0.1)  # the start radius never exceeds eps_max


# ---------------------------------------------------------------------- FOSC and dynamic AT


def test_fosc_is_nonnegative_and_matches_the_paper_formula(batch, digits_model):
    x, y = batch
    x_rand = THREAT.random_init(x, make_generator(0, 5))
    value = fosc(digits_model, x, x_rand, y, THREAT)
    paper = fosc(digits_model, x, x_rand, y, 0.1, box=None)
    assert value.shape == (x.shape[0],) and bool((value >= 0).all())
    assert bool((value <= paper + 1e-6).all())  # the box only removes moves
    xr = x_rand.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(digits_model(xr), y, reduction="sum"), xr)
    by_hand = 0.1 * g.flatten(1).abs().sum(1) - ((x_rand - x) * g).flatten(1).sum(1)
    assert torch.allclose(paper, by_hand, rtol=1e-4, atol=1e-6)
    # Away from the box both definitions agree.
    mid = 0.25 + 0.5 * x
    assert torch.allclose(fosc(digits_model, mid, THREAT.project(mid + (x_rand - x), mid), y, THREAT),
                          fosc(digits_model, mid, THREAT.project(mid + (x_rand - x), mid), y, 0.1, box=None), atol=1e-5)


def test_fosc_is_zero_at_a_converged_linf_corner(batch):
    """A binary linear model: the sign of the input gradient is the same everywhere, so PGD reaches
    the optimal corner of the (ball and box) in one step and stays: FOSC 0 there, not before."""
    x, _ = batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    y = (torch.arange(x.shape[0]) % 2).long()
    x0 = THREAT.random_init(x, make_generator(0, 6))
    start = fosc(model, x, x0, y, THREAT)
    x_adv = inner.maximize(model, x, inner.cross_entropy_loss(y), THREAT, 3, THREAT.eps, x0)
    end = fosc(model, x, x_adv, y, THREAT)
    assert float(start.min()) > 1e-3
    assert float(end.max()) < 1e-4 * float(start.mean())  # 0 up to the projection's rounding margin (~1e-7 a pixel)


def test_fosc_falls_as_pgd_runs_longer(batch, digits_model):
    x, y = batch
    means = []
    for steps in (1, 3, 10, 30):
        x_adv = inner.maximize(digits_model, x, inner.cross_entropy_loss(y), THREAT, steps, 2.5 * THREAT.eps / steps,
                               "uniform", make_generator(0, 7))
        means.append(float(fosc(digits_model, x, x_adv, y, THREAT).mean()))
    assert means == sorted(means, reverse=True) and means[-1] < 0.5 * means[0], means


def test_dynamic_criterion_schedule():
    obj = create_objective("dynamic-at", THREAT)
    seen = []
    for progress in (0.0, 0.4, 0.8, 0.95):
        obj.set_progress(0, progress)
        seen.append(obj.criterion())
    assert seen == pytest.approx([0.5, 0.25, 0.0, 0.0])


def test_dynamic_at_takes_fewer_pgd_steps_early_than_late(batch, digits_model):
    x, y = batch
    model = copy.deepcopy(digits_model)
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    obj = create_objective("dynamic-at", THREAT)
    counted, reported = {}, {}
    for progress in (0.0, 0.9):
        obj.set_progress(0, progress)
        rows.clear()
        _, logs = obj(model, x, y, make_generator(0, 8))
        # Forward passes of the attack (one per step plus the final FOSC), and the training pass.
        counted[progress] = sum(rows[:-1]) / x.shape[0] - 1
        reported[progress] = float(logs["pgd_steps"])
        assert float(logs["fosc"]) >= 0
    assert reported[0.9] == pytest.approx(10.0, abs=0.5)  # c_t = 0: (nearly) full PGD
    assert 1.0 <= reported[0.0] < 0.5 * reported[0.9]
    assert counted[0.0] < 0.5 * counted[0.9]


def test_dynamic_pgd_stops_per_sample_at_the_criterion(batch, digits_model):
    x, y = batch
    x_adv, value, taken = dynamic_pgd(digits_model, x, y, THREAT, 10, 0.025, 0.2, "uniform", make_generator(0, 9))
    assert bool(THREAT.contains(x_adv, x, tol=0).all())
    assert bool((taken >= 1).all()) and bool((taken <= 10).all())
    stopped = taken < 10
    assert bool(stopped.any()) and bool((value[stopped] <= 0.2).all())  # stopped only once converged enough
    assert torch.allclose(value, fosc(digits_model, x, x_adv, y, THREAT), atol=1e-5)


def test_mma_training_enlarges_the_margins(digits_train, digits_test, digits_model):
    """Three epochs of MMA give larger test margins, and more points robust at eps, than standard
    training (measured: mean margin 0.108 vs 0.097, robust at eps 0.1: 0.62 vs 0.46)."""
    test = digits_test.subset(250)
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    train(model, digits_train, TrainConfig(epochs=3, batch_size=64, lr=0.1, seed=0),
          create_objective("mma", THREAT, steps=3), progress=False)
    stats = {}
    for name, net in (("mma", model.eval()), ("standard", digits_model)):
        found = adaptive_norm_pgd(net, test.x, test.y, THREAT, 0.15, generator=make_generator(0, 2))
        stats[name] = (float(found.margin.mean()), float((found.correct & (found.margin > THREAT.eps)).float().mean()))
    assert stats["mma"][0] > stats["standard"][0] + 0.005, stats
    assert stats["mma"][1] > stats["standard"][1] + 0.08, stats
