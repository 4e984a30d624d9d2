"""BPDA through k-WTA (attack ``kwta-bpda``, declared by the ``sampled-gradients`` defense)."""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks import create_attack
from robustlab.defenses import apply_defenses
from robustlab.eval.runner import adaptive_attacks
from robustlab.models.kwta import KWTA, SmoothKWTA, swap_kwta, use_kwta
from robustlab.threat import ThreatModel


def _net() -> nn.Module:
    torch.manual_seed(0)
    return use_kwta(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                  nn.Linear(64, 4)), 0.1).eval()


def test_smooth_kwta_same_values_and_gradient_below_threshold():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    hard, smooth = KWTA(0.1)(x), SmoothKWTA(0.1)(x)
    assert torch.equal(hard, smooth)
    (g_hard,) = torch.autograd.grad(hard.sum(), x)
    (g_soft,) = torch.autograd.grad(SmoothKWTA(0.1)(x).sum(), x)
    losers = hard == 0
    assert g_hard[losers].abs().max() == 0  # the real k-WTA: no gradient to the units that lost
    # the surrogate: the loser nearest the threshold in each sample (the one a small step makes a winner) gets one
    runner_up = x.detach().masked_fill(~losers, -torch.inf).argmax(1)
    assert (g_soft[torch.arange(3), runner_up].abs() > 1e-2).all()
    assert ((g_soft.abs() > 1e-3) & losers).any(1).all()


def test_swap_kwta_round_trip():
    net = _net()
    assert swap_kwta(net, 0.2) == 2 and all(not isinstance(m, KWTA) or isinstance(m, SmoothKWTA) for m in net.modules())
    assert swap_kwta(net, None) == 2
    assert sum(type(m) is KWTA for m in net.modules()) == 2


def test_kwta_bpda_breaks_more_than_pgd_and_restores_the_model():
    net = _net()
    x = torch.rand(64, 1, 8, 8)
    y = net(x).argmax(1)
    threat = ThreatModel("linf", 0.1)
    defended = apply_defenses(net, ["sampled-gradients:sigma=0.1,draws=4"])
    result = create_attack("kwta-bpda", threat, steps=30).run(defended, x, y, torch.Generator().manual_seed(0))
    assert sum(type(m) is KWTA for m in net.modules()) == 2  # the real layers are back
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        fooled = net(result.x_adv).argmax(1) != y
    assert torch.equal(fooled, result.success)  # success judged on the real model
    plain = create_attack("pgd", threat, steps=30).run(net, x, y, torch.Generator().manual_seed(0)).x_adv
    with torch.no_grad():
        fooled_plain = net(plain).argmax(1) != y
    assert fooled.float().mean() >= fooled_plain.float().mean()
    assert fooled.float().mean() > 0.5


def test_sampled_gradients_declares_kwta_bpda():
    defended = apply_defenses(_net(), ["sampled-gradients"])
    needs = defended.needs()
    assert "kwta-bpda" in needs.attacks
    names = [a.name for a in adaptive_attacks([create_attack("apgd-ce", ThreatModel("linf", 0.1))], needs)]
    assert names == ["apgd-ce", "kwta-bpda"]
