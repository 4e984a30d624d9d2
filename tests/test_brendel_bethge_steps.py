"""Brendel-Bethge's per-step subproblems in L1 and L0 (robustlab/attacks/brendel_bethge.py).

What is checked, on random subproblems ``min ||delta - d|| s.t. b . delta = c, ||delta||_2 <= r,
lo <= delta <= hi`` (d = x0 - x, the box that of the pixels around x): every step the solver
returns lies on the hyperplane, in the trust region and in the box (the old L0 step was accepted off
the hyperplane and reverted the walk to the clean image); with a trust region that does not bind,
the L0 step changes exactly the fewest coordinates that can reach the hyperplane (a greedy count:
largest reach first), and a tight trust region costs no more coordinates than the dense L2 step.
"""

from __future__ import annotations

import pytest
import torch

from robustlab.attacks import create_attack
from robustlab.attacks.fab import min_norm_to_hyperplane
from robustlab.threat import ThreatModel


def _problem(seed: int, m: int = 6, n: int = 60, changed: int = 8):
    """m subproblems of n coordinates: x0 in the box, x differing from it in ``changed`` places,
    b a random normal, c a reachable change (half of what the box allows, either sign)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(m, n, generator=g, dtype=torch.float64)
    x = x0.clone()
    for i in range(m):
        idx = torch.randperm(n, generator=g)[:changed]
        x[i, idx] = torch.rand(changed, generator=g, dtype=torch.float64)
    b = torch.randn(m, n, generator=g, dtype=torch.float64)
    lo, hi = -x, 1 - x
    sign = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).double()
    reach = (b * torch.where((b > 0) == (sign > 0).unsqueeze(1), hi, lo)).sum(dim=1)
    c = 0.3 * reach
    return x0 - x, b, c, lo, hi


def _solver(norm):
    attack = create_attack("brendel-bethge", ThreatModel(norm, 1.0))
    return {"l1": attack._step_l1, "l0": attack._step_l0}[norm]


def _greedy_l0(d, b, c, lo, hi):
    """Per row the fewest coordinates to change (from d, the clean image) so that b . delta = c:
    the change still needed after reverting everything to d, covered by the coordinates with the
    largest reach (each moved to the end of its box in the helpful direction) first."""
    need = c - (b * d).sum(dim=1)
    up = need > 0
    end = torch.where((b > 0) == up.unsqueeze(1), hi, lo)
    gain = (b * (end - d)).abs().sort(dim=1, descending=True).values.cumsum(dim=1)
    return (gain < need.abs().unsqueeze(1) * (1 - 1e-12)).sum(dim=1) + 1


@pytest.mark.parametrize("norm", ["l1", "l0"])
@pytest.mark.parametrize("slack", [None, 3.0, 1.1])
def test_the_step_is_on_the_hyperplane_in_the_trust_region_and_box(norm, slack):
    """slack: the trust region's radius over the L2-smallest step onto the hyperplane (None: 100)."""
    d, b, c, lo, hi = _problem(1)
    l2_min = min_norm_to_hyperplane(b, c, lo, hi, "l2").norm(dim=1)
    r = torch.full_like(c, 100.0) if slack is None else slack * l2_min
    delta = _solver(norm)(d, b, c, lo, hi, r)
    assert (((b * delta).sum(dim=1) - c).abs() <= 1e-6 * (1 + c.abs())).all(), (b * delta).sum(dim=1) - c
    assert (delta.norm(dim=1) <= r * (1 + 1e-6)).all()
    assert ((delta >= lo - 1e-12) & (delta <= hi + 1e-12)).all()
    if norm == "l0":  # sparse as the trust region allows: never more coordinates than the dense step
        count = ((delta - d).abs() > 1e-12).sum(dim=1)
        assert (count < d.shape[1]).all(), count


def test_l0_step_without_a_binding_trust_region_changes_the_fewest_coordinates():
    d, b, c, lo, hi = _problem(2, m=8)
    r = torch.full_like(c, 100.0)
    delta = _solver("l0")(d, b, c, lo, hi, r)
    count = ((delta - d).abs() > 1e-12).sum(dim=1)
    assert torch.equal(count, _greedy_l0(d, b, c, lo, hi)), (count, _greedy_l0(d, b, c, lo, hi))
    # And far fewer than the coordinates the noise had changed plus the dense step would change.
    assert int(count.max()) < d.shape[1] // 4
