"""The one-pixel attack (Su, Vargas & Sakurai 2019, "One pixel attack for fooling deep neural
networks"): differential evolution over a few pixels.

Score-based and sparse: a candidate sets ``pixels`` pixels (row, column and a value per channel) to
arbitrary values in the box, and the attack sees only the model's probabilities. Differential
evolution, as the paper and torchattacks run it (scipy's ``best1bin`` with recombination 1, i.e.
every trial is the mutant): a population of about ``popsize`` candidates per sample, drawn
uniformly; each generation every member's trial is ``best + F (r1 - r2)`` (F drawn uniformly
from [0.5, 1) per generation, r1 and r2 two other random members), coordinates outside their bounds
redrawn uniformly, and a trial replaces its member when the true class's probability (targeted: one
minus the target's) is no higher.

The attack changes pixels by any amount, so under an Lp threat model it is a minimum-norm attack
(the point it returns may lie outside the ball: the evaluation counts it only inside); its budget is
the number of pixels. Queries are counted per sample exactly (the initial population, then one per
member and generation); a sample stops at the first candidate that is misclassified (that one is
returned).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.spsa import query_logits
from robustlab.errors import RobustlabError
from robustlab.threat import NORMS


def set_pixels(x: torch.Tensor, genes: torch.Tensor, pixels: int) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) with pixels set by ``genes`` (N, K, pixels * (2 + C)): K images per
    sample, each ``x`` with, per encoded pixel, row ``floor(g0)``, column ``floor(g1)`` set to the
    values ``g2..`` (channels). Returns (N, K, C, H, W)."""
    n, c, h, w = x.shape
    k = genes.shape[1]
    out = x.unsqueeze(1).expand(n, k, c, h, w).clone()
    g = genes.view(n, k, pixels, 2 + c)
    rows = g[..., 0].long().clamp(0, h - 1)
    cols = g[..., 1].long().clamp(0, w - 1)
    ni = torch.arange(n, device=x.device).view(n, 1, 1).expand_as(rows)
    ki = torch.arange(k, device=x.device).view(1, k, 1).expand_as(rows)
    for ch in range(c):
        out[ni, ki, ch, rows, cols] = g[..., 2 + ch].to(x.dtype)
    return out


@register_attack
class OnePixel(Attack):
    """One-pixel attack: differential evolution over ``pixels`` pixels (score-based, sparse).

    pixels: pixels changed; steps: generations; popsize: the population per sample, rounded down to a
    multiple of the encoding's dimension ``pixels * (2 + C)`` (at least one multiple, at least 5
    members), as torchattacks sizes it.
    """

    name = "onepixel"
    norms = NORMS
    kind = "score-based"
    minimum_norm = True
    defaults = {"pixels": 1, "steps": 10, "popsize": 10}

    def validate(self) -> None:
        super().validate()
        for key in ("pixels", "popsize"):
            if self.params[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {self.params[key]}")

    def _fitness(self, model: nn.Module, cand: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fitness to minimize, success) of candidate images (M, K, C, H, W) for labels ``y`` (M,)."""
        m, k = cand.shape[:2]
        logits = query_logits(self, model, cand.flatten(0, 1)).view(m, k, -1)
        prob = logits.softmax(dim=2).gather(2, y.view(m, 1, 1).expand(m, k, 1)).squeeze(2)
        fit = 1 - prob if self.targeted else prob
        yk = y.view(m, 1).expand(m, k).reshape(-1)
        return fit, self.is_success(logits.flatten(0, 1), yk).view(m, k)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n, c, h, w = x.shape
        dev, dt = x.device, x.dtype
        npix = p["pixels"]
        dim = npix * (2 + c)
        size = max(5, max(1, p["popsize"] // dim) * dim)
        lo = torch.tensor([0.0, 0.0] + [self.threat.lower] * c, device=dev, dtype=dt).repeat(npix)
        hi = torch.tensor([float(h), float(w)] + [self.threat.upper] * c, device=dev, dtype=dt).repeat(npix)
        # Positions are in [0, H) and [0, W): just below the upper end.
        hi_draw = torch.where(torch.arange(dim, device=dev) % (2 + c) < 2, hi - 1e-4, hi)

        def draw(shape):
            u = torch.rand(*shape, dim, device=dev, dtype=dt, generator=generator)
            return lo + u * (hi_draw - lo)

        x_adv = x.clone()
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        live = torch.arange(n, device=dev)
        pop = draw((n, size))
        fit, hit = self._fitness(model, set_pixels(x, pop, npix), y)
        forwards += size
        for gen_i in range(p["steps"] + 1):
            # Samples with a misclassified member stop here, with that member.
            done = hit.any(dim=1)
            if bool(done.any()):
                first = hit[done].float().argmax(dim=1)
                rows = live[done]
                x_adv[rows] = set_pixels(x[rows], pop[done].gather(
                    1, first.view(-1, 1, 1).expand(-1, 1, dim)), npix).squeeze(1)
                success[rows] = True
                keep = ~done
                live, pop, fit = live[keep], pop[keep], fit[keep]
            if live.numel() == 0 or gen_i == p["steps"]:
                break
            m = live.numel()
            scale = 0.5 + 0.5 * torch.rand((), device=dev, dtype=dt, generator=generator)
            best = pop.gather(1, fit.argmin(dim=1).view(m, 1, 1).expand(m, 1, dim))
            # Two other members per trial: r1 uniform among the others, r2 among the others but r1.
            idx = torch.arange(size, device=dev).view(1, size)
            r1 = (idx + 1 + (torch.rand(m, size, device=dev, generator=generator) * (size - 1)).long()) % size
            r2 = (idx + 1 + (torch.rand(m, size, device=dev, generator=generator) * (size - 1)).long()) % size
            r2 = torch.where(r2 == r1, (r1 + 1) % size, r2)
            r2 = torch.where(r2 == idx, (r2 + 1) % size, r2)
            take = lambda r: pop.gather(1, r.unsqueeze(2).expand(m, size, dim))  # noqa: E731
            trial = best + scale * (take(r1) - take(r2))
            out = (trial < lo) | (trial >= hi)
            trial = torch.where(out, draw((m, size)), trial)
            t_fit, t_hit = self._fitness(model, set_pixels(x[live], trial, npix), y[live])
            forwards[live] += size
            better = t_fit <= fit
            pop = torch.where(better.unsqueeze(2), trial, pop)
            fit = torch.where(better, t_fit, fit)
            # A misclassified trial ends its sample at the top of the next generation.
            pop = torch.where(t_hit.unsqueeze(2), trial, pop)
            hit = t_hit
        if live.numel():
            best = pop.gather(1, fit.argmin(dim=1).view(-1, 1, 1).expand(-1, 1, dim))
            x_adv[live] = set_pixels(x[live], best, npix).squeeze(1)
        return AttackResult(x_adv, success, torch.zeros_like(forwards), forwards)
