"""LS-PGA, the thermometer's own adaptive attack: the bucket interface agrees with the encoding, the
attack reaches the exact worst case of a linear model behind the encoding (computed per pixel), where
BPDA through the relaxation stops short, and the evaluation adds it to a thermometer's adaptive attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from helpers import gen, predict

from robustlab.attacks import create_attack
from robustlab.defenses import apply_defenses, create_defense
from robustlab.errors import RobustlabError
from robustlab.eval.runner import adaptive_attacks
from robustlab.threat import ThreatModel

LEVELS, EPS = 8, 0.05


def test_buckets_relax_and_bucket_value_agree_with_the_encoding():
    t = create_defense("thermometer", levels=LEVELS)
    x = torch.rand(4, 2, 5, 5, generator=gen(0))
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 3 / LEVELS])  # the edges and a threshold itself
    b = t.buckets(x)
    one_hot = torch.nn.functional.one_hot(b, LEVELS + 1).permute(0, 1, 4, 2, 3).to(x.dtype)
    assert torch.equal(t.relax(one_hot), t.transform(x))
    threat = ThreatModel("linf", EPS)
    lo, hi = threat.project(x - 1, x), threat.project(x + 1, x)
    for bucket in range(LEVELS + 1):
        want = torch.full_like(b, bucket)
        reach = (t.buckets(lo) <= want) & (want <= t.buckets(hi))
        v = t.bucket_value(want, lo, hi)
        assert torch.equal(t.buckets(v)[reach], want[reach])
        assert bool(((v >= lo) & (v <= hi))[reach].all())
        assert torch.equal(threat.project(v, x)[reach], v[reach])  # kept as it is by the projection


def _linear_behind_thermometer(digits_train, digits_test):
    """A linear classifier trained on the 8-level code of the digits, and 60 test images it gets right."""
    enc = create_defense("thermometer", levels=LEVELS)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(LEVELS * 64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    code = enc.transform(digits_train.x)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(code), digits_train.y).backward()
        opt.step()
    defended = apply_defenses(net.eval(), [f"thermometer:levels={LEVELS}"])
    x, y = digits_test.x, digits_test.y
    keep = (predict(defended, x) == y).nonzero()[:60, 0]
    return defended, net, x[keep], y[keep]


def _exact_robust(net: nn.Linear, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Per sample, whether no code reachable in the ball changes the linear model's class: the margin
    of class y over t is a sum over pixels of a term fixed by the pixel's bucket, so its minimum takes
    each pixel's worst reachable bucket."""
    enc = create_defense("thermometer", levels=LEVELS)
    w = net.weight.detach().view(10, 1, LEVELS, 8, 8)
    prefix = torch.cat([torch.zeros_like(w[:, :, :1]), w.cumsum(2)], dim=2)  # (10, 1, L+1, 8, 8): bucket b's share
    lo, hi = threat.project(x - 1, x), threat.project(x + 1, x)
    index = torch.arange(LEVELS + 1).view(1, 1, -1, 1, 1)
    reach = (index >= enc.buckets(lo).unsqueeze(2)) & (index <= enc.buckets(hi).unsqueeze(2))  # (N, 1, L+1, 8, 8)
    robust = torch.ones(len(y), dtype=torch.bool)
    bias = net.bias.detach()
    for t in range(10):
        diff = (prefix[y] - prefix[t]).masked_fill(~reach, torch.inf)  # (N, 1, L+1, 8, 8)
        margin = diff.amin(dim=2).flatten(1).sum(1) + bias[y] - bias[t]
        robust &= (margin > 0) | (y == t)
    return robust


def test_ls_pga_reaches_the_exact_worst_case_of_a_linear_model_where_bpda_does_not(digits_train, digits_test):
    defended, net, x, y = _linear_behind_thermometer(digits_train, digits_test)
    threat = ThreatModel("linf", EPS)
    exact = _exact_robust(net[1], x, y, threat)
    assert 0.1 < exact.float().mean() < 0.9  # a budget where the question is open
    ls = create_attack("ls-pga", threat, steps=50).run(defended, x, y, gen(0))
    ls_robust = predict(defended, ls.x_adv) == y
    assert bool((ls.success == ~ls_robust).all())  # what it claims is what the real encoding predicts
    assert torch.equal(ls_robust, exact)
    bpda = create_attack("apgd-ce", threat, steps=50).run(defended, x, y, gen(0))
    bpda_robust = predict(defended, bpda.x_adv) == y
    assert bool((bpda_robust >= exact).all()) and int(bpda_robust.sum()) > int(exact.sum())


def test_the_evaluation_adds_ls_pga_for_a_thermometer_and_ls_pga_needs_an_encoding():
    threat = ThreatModel("linf", EPS)
    defended = apply_defenses(nn.Identity(), [f"thermometer:levels={LEVELS}"])
    needs = defended.needs()
    assert needs.attacks == ("ls-pga",) and "plus ls-pga" in needs.describe()
    names = [a.name for a in adaptive_attacks([create_attack("apgd-ce", threat)], needs)]
    assert names == ["apgd-ce", "ls-pga"]
    assert [a.name for a in adaptive_attacks([create_attack("apgd-ce", ThreatModel("l2", 1.0))], needs)] == ["apgd-ce"]
    with pytest.raises(RobustlabError, match="attack 'ls-pga' attacks a model behind one discrete input encoding"):
        plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        create_attack("ls-pga", threat).run(plain, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(RobustlabError, match="anneal must be >= 1"):
        create_attack("ls-pga", threat, anneal=0.5)
