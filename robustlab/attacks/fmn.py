"""FMN, the fast minimum-norm attack (Pintor et al. 2021, "Fast minimum-norm adversarial attacks
through adaptive norm constraints"), in Linf, L2, L1 and L0 (changed pixels).

Each step takes the gradient of the logit margin ``z_y - max_{j != y} z_j`` (targeted: ``max_{j != t}
z_j - z_t``) at ``x + delta``, moves ``delta`` down it by ``alpha`` along the L2-normalized gradient,
and projects ``delta`` onto the ball of the current per-sample radius ``eps_k`` (and the box). The
radius adapts: a misclassified iterate shrinks it (``min(eps_k (1 - gamma), best norm)``); before a
first success it is set to the current norm plus the linear estimate of the distance to the boundary
(``|margin| / ||grad||_dual``), overshot by ``(1 + gamma)`` (not in the paper: on a locally linear
model the exact estimate lands on the boundary, where float ties can keep a sample from ever
crossing it); after one, an iterate that is not misclassified grows it by
``(1 + gamma)``. In L0 the radius is a whole number of pixels, shrunk or grown by at least one
(``floor(eps_k (1 -/+ gamma))``), the projection keeps the ``eps_k`` pixels with the largest change,
and there is no line search (scaling a perturbation does not change its L0 size). ``alpha`` and ``gamma`` decay by cosine annealing from ``alpha_init`` to
``alpha_init / 100`` and from ``gamma_init`` to ``gamma_final``. The smallest misclassified iterate
is kept; ``line_search`` bisection steps towards the clean point (forward passes only, not in the
paper; 0 turns them off) finish it, as for FAB-min and CW.

A minimum-norm attack: it returns the smallest misclassifying perturbation found wherever it lies
(the evaluation counts it only inside eps). With ``early_stop`` a sample leaves once its best
perturbation lies within eps (for fixed-budget use in an ensemble: no step is spent refining a point
that already counts). Costs per step and active sample: one forward pass and one input gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import bisect_to_boundary
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin
from robustlab.threat import L0, norms

DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def cosine(start: float, end: float, step: int, steps: int) -> float:
    """Cosine annealing from ``start`` (step 0) towards ``end`` (step ``steps``)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def worst_norm(x: torch.Tensor, norm: str, lower: float, upper: float) -> torch.Tensor:
    """Per sample, the largest norm a perturbation inside the box can have."""
    return norms(torch.maximum(x - lower, upper - x), norm)


@register_attack
class FMN(Attack):
    """FMN (minimum-norm; targeted or untargeted).

    steps: iterations; alpha_init: the first step size (L2 norm of the step; decays to
    ``alpha_init / 100``); gamma_init, gamma_final: the radius update factor's start and end;
    line_search: final bisection steps towards the clean point; early_stop: a sample leaves once its
    best point lies within eps.
    """

    name = "fmn"
    norms = ("linf", "l2", "l1", L0)
    minimum_norm = True
    defaults = {"steps": 100, "alpha_init": 1.0, "gamma_init": 0.05, "gamma_final": 0.001, "line_search": 10,
                "early_stop": False}

    def validate(self) -> None:
        super().validate()
        p = self.params
        if not p["alpha_init"] > 0:
            raise RobustlabError(f"attack {self.name!r}: alpha_init must be > 0, got {p['alpha_init']}")
        if not 0 < p["gamma_final"] <= p["gamma_init"] < 1:
            raise RobustlabError(f"attack {self.name!r}: need 0 < gamma_final <= gamma_init < 1, got "
                                 f"{p['gamma_final']} and {p['gamma_init']}")
        if p["line_search"] < 0:
            raise RobustlabError(f"attack {self.name!r}: line_search must be >= 0, got {p['line_search']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p, threat = self.params, self.threat
        norm, n, dev = threat.norm, x.shape[0], x.device
        view = (-1,) + (1,) * (x.dim() - 1)
        best = x.clone()
        best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=dev)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        idx = torch.arange(n, device=dev)
        x0, yy = x, y
        delta = torch.zeros_like(x)
        radius = torch.full((n,), 1.0 if norm == L0 else math.inf, dtype=x.dtype, device=dev)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        largest = worst_norm(x, norm, threat.lower, threat.upper)
        stop_at = threat.eps if p["early_stop"] else None
        for step in range(p["steps"]):
            alpha = cosine(p["alpha_init"], p["alpha_init"] / 100, step, p["steps"])
            gamma = cosine(p["gamma_init"], p["gamma_final"], step, p["steps"])
            x_req = (x0 + delta).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = check_logits(model(x_req), x_req.shape[0])
                margin = -cw_margin(logits, yy, self.targeted)  # > 0: not (yet) adversarial
                (g,) = torch.autograd.grad(margin.sum(), x_req)
            grads[idx] += 1
            forwards[idx] += 1
            logits, margin = logits.detach(), margin.detach()
            adv = self.is_success(logits, yy)
            size = norms(delta, norm)
            better = adv & (size < best_norm[idx])
            best[idx[better]] = x_req.detach()[better]
            best_norm[idx[better]] = size[better]
            found[idx] |= adv
            if norm == L0:  # whole pixels: shrink or grow by at least one
                shrink = torch.minimum(torch.minimum(radius - 1, (radius * (1 - gamma)).floor()), best_norm[idx])
                radius = torch.where(adv, shrink, torch.maximum(radius + 1, (radius * (1 + gamma)).floor()))
                radius = radius.clamp_min(1.0)
            else:
                boundary = margin.abs() / norms(g, DUAL[norm]).clamp_min(1e-12)
                radius = torch.where(
                    adv, torch.minimum(radius * (1 - gamma), best_norm[idx]),
                    torch.where(found[idx], radius * (1 + gamma), size + boundary * (1 + gamma)))
            radius = torch.minimum(radius, largest[idx])
            if stop_at is not None:
                keep = best_norm[idx] > stop_at
                if not bool(keep.all()):
                    idx, x0, yy, delta, g = idx[keep], x0[keep], yy[keep], delta[keep], g[keep]
                    radius = radius[keep]
                    if idx.numel() == 0:
                        break
            step_dir = g / norms(g, "l2").clamp_min(1e-12).view(view)
            moved = x0 + delta - alpha * step_dir
            delta = threat.project_radius(moved, x0, radius) - x0
        if norm != L0:  # scaling a perturbation does not change how many pixels it touches
            bisect_to_boundary(model, x, y, best, best_norm, norm, p["line_search"], self.is_success, forwards)
        return AttackResult(best, torch.isfinite(best_norm), grads, forwards)
