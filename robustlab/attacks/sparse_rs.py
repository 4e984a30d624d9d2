"""Sparse-RS (Croce et al. 2022, "Sparse-RS: a versatile framework for query-efficient sparse black-box
adversarial attacks"), L0 version: a score-based attack that changes at most ``eps`` pixels.

The perturbation is a set of ``k = eps`` pixels, each set to a corner of the colour cube (every
channel at the box's lower or upper bound). It starts from a random set with random corners; each
iteration swaps ``m`` pixels of the set for ``m`` pixels outside it (given new random corners) and
keeps the swap if the margin loss ``z_y - max_{j != y} z_j`` (targeted: ``max_{j != t} z_j - z_t``)
did not increase. ``m = max(1, round(p * k))`` where ``p`` starts at ``p_init`` and halves on the
schedule the paper defines for 10,000 queries (iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000,
8000), rescaled to ``queries``. A sample stops as soon as it is misclassified.

Costs: one forward pass (query) per sample for the start and one per iteration while it runs; no
gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin
from robustlab.threat import L0, random_pixels

HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # in a budget of 10,000 queries


def swap_fraction(p_init: float, it: int, queries: int) -> float:
    """The fraction of the pixel set swapped at iteration ``it`` (the paper's schedule, rescaled)."""
    scaled = int(it / queries * 10000)
    return p_init / 2 ** sum(scaled > h for h in HALVINGS)


@register_attack
class SparseRS(Attack):
    """Sparse-RS in L0 (score-based; targeted or untargeted).

    queries: iterations (model queries per sample after the first); p_init: the first swap fraction.
    """

    name = "sparse-rs"
    norms = (L0,)
    kind = "score-based"
    defaults = {"queries": 10000, "p_init": 0.3}

    def validate(self) -> None:
        super().validate()
        p = self.params
        if p["queries"] < 1:
            raise RobustlabError(f"attack {self.name!r}: queries must be >= 1, got {p['queries']}")
        if not 0 < p["p_init"] <= 1:
            raise RobustlabError(f"attack {self.name!r}: p_init must be in (0, 1], got {p['p_init']}")

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(model, x)
        return -cw_margin(logits, y, self.targeted), self.is_success(logits, y)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p, threat = self.params, self.threat
        n, c, h, w = x.shape
        k = min(int(threat.eps), h * w)
        dev = x.device
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        best = random_pixels(x, k, threat.lower, threat.upper, generator)
        loss, success = self._loss(model, best, y)
        forwards += 1
        if k == 0:
            return AttackResult(best, success, grads, forwards)
        # The pixel set of each sample: True where the pixel may differ (k per image).
        mask = (best != x).any(dim=1).flatten(1)
        # Pixels whose random corner equalled the clean pixel still belong to the set: refill to k.
        short = k - mask.sum(dim=1)
        if bool((short > 0).any()):
            scores = torch.rand(n, h * w, device=dev, generator=generator).masked_fill(mask, -1.0)
            order = scores.argsort(dim=1, descending=True)
            rank = torch.arange(h * w, device=dev).expand(n, -1)
            mask.scatter_(1, order, mask.gather(1, order) | (rank < short.unsqueeze(1)))
        for it in range(p["queries"]):
            active = (~success).nonzero(as_tuple=True)[0]
            if active.numel() == 0:
                break
            m = max(1, min(round(swap_fraction(p["p_init"], it, p["queries"]) * k), k, h * w - k))
            if h * w - k == 0:
                m = 0
            xa, ma, cur = x[active], mask[active], best[active]
            na = active.numel()
            new_mask = ma.clone()
            if m > 0:
                out_idx = torch.rand(na, h * w, device=dev, generator=generator).masked_fill(~ma, -1.0).topk(m, 1).indices
                in_idx = torch.rand(na, h * w, device=dev, generator=generator).masked_fill(ma, -1.0).topk(m, 1).indices
                new_mask.scatter_(1, out_idx, False)
                new_mask.scatter_(1, in_idx, True)
            fresh = torch.zeros(na, h * w, dtype=torch.bool, device=dev)
            fresh.scatter_(1, in_idx if m > 0 else fresh.long()[:, :0], True)
            corners = threat.lower + (threat.upper - threat.lower) * torch.randint(
                0, 2, (na, c, h * w), device=dev, generator=generator).to(x.dtype)
            flat_cur, flat_x = cur.flatten(2), xa.flatten(2)
            cand = torch.where(fresh.unsqueeze(1), corners, flat_cur)
            cand = torch.where(new_mask.unsqueeze(1), cand, flat_x).view_as(xa)
            new_loss, new_success = self._loss(model, cand, y[active])
            forwards[active] += 1
            better = new_loss <= loss[active]
            rows = active[better]
            best[rows], mask[rows], loss[rows] = cand[better], new_mask[better], new_loss[better]
            success[rows] = new_success[better]
        return AttackResult(best, success, grads, forwards)
