"""Pixle (Pomponi, Scardapane & Uncini 2022, "Pixle: a fast and effective black-box attack based on
rearranging pixels"): random search that copies patches of the image's own pixels elsewhere.

Score-based and sparse. Each iteration draws, per sample, a patch of the clean image (top-left corner
uniform, width and height uniform in ``x_dimensions`` and ``y_dimensions``, pixels or, below 1,
fractions of the image side, cut at the image border) and, for each of its pixels, a uniformly random
destination (the "random" pixel mapping); the candidate is the restart's starting image with the
destinations set to the patch's pixels. A candidate that lowers the true class's probability
(targeted: raises the target's) is the best so far. A restart runs ``iterations`` such candidates
from one starting image; the next restart starts from the best so far (from the last candidate
while there is none, as the reference implementation does).

Pixels take values other pixels of the image have, by any amount: under an Lp threat model it is a
minimum-norm attack (points outside the ball are recorded, not counted). Queries are counted per
sample exactly (one per candidate, plus one for the clean image); a sample stops at the first
misclassified candidate, which is returned.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.spsa import query_logits
from robustlab.errors import RobustlabError
from robustlab.threat import NORMS


def _extent(bounds: list, side: int) -> tuple[int, int]:
    """(smallest, largest) patch extent in pixels from a [lo, hi] pair of pixels or fractions."""
    lo, hi = (max(1, int(v) if float(v) >= 1 else round(side * float(v))) for v in bounds)
    return min(lo, side), min(max(lo, hi), side)


@register_attack
class Pixle(Attack):
    """Pixle, score-based random search over pixel rearrangements (the "random" mapping).

    x_dimensions, y_dimensions: [min, max] patch width and height (pixels, or fractions of the side
    when below 1); restarts: restarts; iterations: candidates per restart.
    """

    name = "pixle"
    norms = NORMS
    kind = "score-based"
    minimum_norm = True
    defaults = {"x_dimensions": [2, 10], "y_dimensions": [2, 10], "restarts": 20, "iterations": 10}

    def validate(self) -> None:
        super().validate()
        p = self.params
        if p["iterations"] < 1:
            raise RobustlabError(f"attack {self.name!r}: iterations must be >= 1, got {p['iterations']}")
        for key in ("x_dimensions", "y_dimensions"):
            v = p[key]
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(float(t) > 0 for t in v)):
                raise RobustlabError(f"attack {self.name!r}: {key} must be a pair [min, max] of sizes > 0, got {v!r}")

    def _score(self, model: nn.Module, cand: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score to minimize, success) per image."""
        logits = query_logits(self, model, cand)
        prob = logits.softmax(dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        return (1 - prob if self.targeted else prob), self.is_success(logits, y)

    def _candidates(self, x: torch.Tensor, base: torch.Tensor, generator) -> torch.Tensor:
        """One random rearrangement per sample: ``base`` with a patch of ``x`` copied to random places."""
        m, c, h, w = x.shape
        dev = x.device
        wlo, whi = _extent(self.params["x_dimensions"], w)
        hlo, hhi = _extent(self.params["y_dimensions"], h)
        u = torch.rand(m, 4, device=dev, generator=generator)
        col0 = (u[:, 0] * (w - 1)).long()
        row0 = (u[:, 1] * (h - 1)).long()
        pw = torch.minimum(wlo + (u[:, 2] * (whi - wlo + 1)).long(), w - col0)
        ph = torch.minimum(hlo + (u[:, 3] * (hhi - hlo + 1)).long(), h - row0)
        k = torch.arange(hhi * whi, device=dev)
        di, dj = (k // whi).view(1, -1), (k % whi).view(1, -1)
        valid = (di < ph.view(-1, 1)) & (dj < pw.view(-1, 1))
        dest = torch.rand(m, hhi * whi, 2, device=dev, generator=generator)
        s, kk = valid.nonzero(as_tuple=True)
        src_r, src_c = row0[s] + di[0, kk], col0[s] + dj[0, kk]
        dst_r = (dest[s, kk, 0] * (h - 1)).long()
        dst_c = (dest[s, kk, 1] * (w - 1)).long()
        out = base.clone()
        out.permute(0, 2, 3, 1)[s, dst_r, dst_c] = x.permute(0, 2, 3, 1)[s, src_r, src_c]
        return out

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n, dev = x.shape[0], x.device
        x_adv = x.clone()
        forwards = torch.ones(n, dtype=torch.long, device=dev)
        best_score, success = self._score(model, x, y)
        best = x.clone()
        improved = torch.zeros(n, dtype=torch.bool, device=dev)
        live = (~success).nonzero(as_tuple=True)[0]
        base = x[live].clone()
        for _ in range(p["restarts"]):
            last = base
            for _ in range(p["iterations"]):
                if live.numel() == 0:
                    break
                cand = self._candidates(x[live], base, generator)
                score, hit = self._score(model, cand, y[live])
                forwards[live] += 1
                better = score < best_score[live]
                rows = live[better]
                best[rows], best_score[rows], improved[rows] = cand[better], score[better], True
                last = cand
                if bool(hit.any()):
                    x_adv[live[hit]] = cand[hit]
                    success[live[hit]] = True
                    keep = ~hit
                    live, base, last = live[keep], base[keep], last[keep]
            if live.numel() == 0:
                break
            base = torch.where(improved[live].view(-1, 1, 1, 1), best[live], last)
        x_adv[live] = best[live]
        return AttackResult(x_adv, success, torch.zeros_like(forwards), forwards)
