"""DDN, decoupled direction and norm (Rony et al. 2019, "Decoupling direction and norm for efficient
gradient-based L2 adversarial attacks and defenses"): a minimum-norm L2 attack.

Each step takes the gradient of the cross-entropy (targeted: minus that of the target) at
``x + delta``, moves ``delta`` up it by ``alpha`` along the L2-normalized gradient (``alpha`` decays
from ``alpha_init`` to ``alpha_init / 100`` by cosine annealing), then rescales ``delta`` onto the
sphere of the per-sample radius ``eps_k`` and clips to the box. The radius shrinks by ``(1 - gamma)``
while the iterate is misclassified and grows by ``(1 + gamma)`` while it is not; it starts at
``init_norm``. The smallest misclassified iterate is kept; ``line_search`` bisection steps towards the
clean point finish it (forward passes only, not in the paper; 0 turns them off).

Costs per step and active sample: one forward pass and one input gradient. With ``early_stop`` a
sample leaves once its best point lies within eps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import bisect_to_boundary
from robustlab.attacks.fmn import cosine, worst_norm
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.threat import norms


@register_attack
class DDN(Attack):
    """DDN (minimum-norm L2; targeted or untargeted).

    steps: iterations; init_norm: the first radius; gamma: the radius factor; alpha_init: the first
    step size (decays to ``alpha_init / 100``); line_search: final bisection steps; early_stop: a
    sample leaves once its best point lies within eps.
    """

    name = "ddn"
    norms = ("l2",)
    minimum_norm = True
    defaults = {"steps": 100, "init_norm": 1.0, "gamma": 0.05, "alpha_init": 1.0, "line_search": 10,
                "early_stop": False}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("init_norm", "alpha_init"):
            if not p[key] > 0:
                raise RobustlabError(f"attack {self.name!r}: {key} must be > 0, got {p[key]}")
        if not 0 < p["gamma"] < 1:
            raise RobustlabError(f"attack {self.name!r}: gamma must be in (0, 1), got {p['gamma']}")
        if p["line_search"] < 0:
            raise RobustlabError(f"attack {self.name!r}: line_search must be >= 0, got {p['line_search']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p, threat = self.params, self.threat
        n, dev = x.shape[0], x.device
        view = (-1,) + (1,) * (x.dim() - 1)
        best = x.clone()
        best_norm = torch.full((n,), math.inf, dtype=x.dtype, device=dev)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        idx, x0, yy = torch.arange(n, device=dev), x, y
        delta = torch.zeros_like(x)
        radius = torch.full((n,), p["init_norm"], dtype=x.dtype, device=dev)
        largest = worst_norm(x, "l2", threat.lower, threat.upper)
        sign = -1.0 if self.targeted else 1.0
        for step in range(p["steps"]):
            alpha = cosine(p["alpha_init"], p["alpha_init"] / 100, step, p["steps"])
            x_req = (x0 + delta).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = check_logits(model(x_req), x_req.shape[0])
                loss = sign * F.cross_entropy(logits, yy, reduction="sum")
                (g,) = torch.autograd.grad(loss, x_req)
            grads[idx] += 1
            forwards[idx] += 1
            adv = self.is_success(logits.detach(), yy)
            size = norms(delta, "l2")
            better = adv & (size < best_norm[idx])
            best[idx[better]] = x_req.detach()[better]
            best_norm[idx[better]] = size[better]
            if p["early_stop"]:
                keep = best_norm[idx] > threat.eps
                if not bool(keep.all()):
                    idx, x0, yy, delta, g = idx[keep], x0[keep], yy[keep], delta[keep], g[keep]
                    radius, adv = radius[keep], adv[keep]
                    if idx.numel() == 0:
                        break
            delta = delta + alpha * g / norms(g, "l2").clamp_min(1e-12).view(view)
            radius = torch.minimum(torch.where(adv, radius * (1 - p["gamma"]), radius * (1 + p["gamma"])),
                                   largest[idx])
            delta = delta * (radius / norms(delta, "l2").clamp_min(1e-12)).view(view)
            delta = (x0 + delta).clamp(threat.lower, threat.upper) - x0
        bisect_to_boundary(model, x, y, best, best_norm, "l2", p["line_search"], self.is_success, forwards)
        return AttackResult(best, torch.isfinite(best_norm), grads, forwards)
