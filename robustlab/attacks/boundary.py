"""The Boundary attack (Brendel, Rauber & Bethge 2018, "Decision-based adversarial attacks: reliable
attacks against black-box machine learning models"), L2.

Decision-based: the attack sees only the predicted label. It starts from a misclassified point (the
same blended uniform noise start as HopSkipJump) and then walks along the decision boundary towards
the clean image by rejection sampling. Each step proposes, per sample, one candidate:

1. an orthogonal step: a Gaussian direction, made orthogonal to the line to the clean image, of
   length ``spherical_step * d`` (d the current distance), then pulled back onto the sphere of
   radius d around the clean image;
2. a step towards the clean image of length ``source_step * d``.

A candidate that the model misclassifies and that is closer than the current point replaces it.
Every ``stats_every`` steps the orthogonal point alone is queried too, and both step sizes adapt to
the success rates (the last 100 orthogonal probes, the last 30 candidates): above 50% (25%) the
steps grow by ``step_adaptation``, below 20% (10%) they shrink. A sample stops when its
``source_step`` falls below ``convergence`` or its query budget is spent.

It is a minimum-norm attack: it returns the closest adversarial point found, which may lie outside
eps; the evaluation counts it only inside the ball. Every image sent to the model is one query of its
sample, counted exactly; the budget is never exceeded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.hopskipjump import _LabelOracle, blended_start
from robustlab.errors import RobustlabError

#: Length of the success-rate windows of the orthogonal step and of the full candidate step.
SPHERICAL_WINDOW = 100
STEP_WINDOW = 30


@register_attack
class Boundary(Attack):
    """The Boundary attack, L2, decision-based, minimum-norm.

    queries: label queries per sample (the budget, the start included); spherical_step, source_step:
    initial orthogonal and towards-the-source step sizes, relative to the current distance;
    step_adaptation: the factor by which they adapt; stats_every: steps between two adaptations (each
    costs one extra query for the orthogonal probe); convergence: a sample stops when its source step
    falls below this; init_trials: uniform noise images tried per sample for a starting point.
    """

    name = "boundary"
    norms = ("l2",)
    kind = "decision-based"
    minimum_norm = True
    defaults = {
        "queries": 10000, "spherical_step": 0.01, "source_step": 0.01, "step_adaptation": 1.5,
        "stats_every": 10, "convergence": 1e-7, "init_trials": 100,
    }

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("queries", "stats_every", "init_trials"):
            if p[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {p[key]}")
        for key in ("spherical_step", "source_step", "convergence"):
            if not p[key] > 0:
                raise RobustlabError(f"attack {self.name!r}: {key} must be > 0, got {p[key]}")
        if not p["step_adaptation"] > 1:
            raise RobustlabError(f"attack {self.name!r}: step_adaptation must be > 1, got {p['step_adaptation']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        oracle = _LabelOracle(self, model, y, p["queries"])
        x_best = x.clone()
        success, rows, cur = blended_start(self, oracle, x, generator, p["init_trials"])
        if rows.numel():
            x_best[rows] = self._walk(oracle, rows, x[rows], cur, generator)
        return AttackResult(x_best, success, torch.zeros_like(oracle.queries), oracle.queries)

    def _proposals(
        self, xr: torch.Tensor, cur: torch.Tensor, spherical: torch.Tensor, source: torch.Tensor, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates, orthogonal points) for each sample: see the module docstring."""
        m = xr.shape[0]
        lo, hi = self.threat.lower, self.threat.upper
        to_source = (xr - cur).flatten(1)
        dist = to_source.norm(dim=1).clamp_min(1e-12)
        unit = to_source / dist.unsqueeze(1)
        noise = torch.randn(to_source.shape, dtype=xr.dtype, device=xr.device, generator=generator)
        noise = noise - (noise * unit).sum(dim=1, keepdim=True) * unit
        noise = noise * (spherical * dist / noise.norm(dim=1).clamp_min(1e-12)).unsqueeze(1)
        # Back onto the sphere of radius dist around the clean image.
        shrink = (1.0 / torch.sqrt(spherical.square() + 1)).unsqueeze(1)
        orth = (xr.flatten(1) + shrink * (noise - to_source)).clamp(lo, hi)
        # Towards the clean image by source_step * dist (measured from the sphere).
        new_dir = xr.flatten(1) - orth
        new_dist = new_dir.norm(dim=1).clamp_min(1e-12)
        length = (source * dist + (new_dist - dist)).clamp_min(0) / new_dist
        cand = (orth + length.unsqueeze(1) * new_dir).clamp(lo, hi)
        return cand.view(m, *xr.shape[1:]), orth.view(m, *xr.shape[1:])

    def _walk(
        self, oracle: _LabelOracle, rows: torch.Tensor, xr: torch.Tensor, cur: torch.Tensor, generator
    ) -> torch.Tensor:
        """The rejection-sampling walk from the starting points ``cur``; returns the final points
        (each the closest adversarial point seen for its sample)."""
        p = self.params
        out = cur.clone()
        m, dev, dt = len(rows), xr.device, xr.dtype
        spherical = torch.full((m,), float(p["spherical_step"]), dtype=dt, device=dev)
        source = torch.full((m,), float(p["source_step"]), dtype=dt, device=dev)
        sph_hits = torch.zeros(m, SPHERICAL_WINDOW, dtype=dt, device=dev)
        sph_len = torch.zeros(m, dtype=torch.long, device=dev)
        step_hits = torch.zeros(m, STEP_WINDOW, dtype=dt, device=dev)
        step_len = torch.zeros(m, dtype=torch.long, device=dev)
        dist = self.threat.distance(cur, xr)
        live = torch.arange(m, device=dev)  # positions (in rows) still walking
        step = 0
        while live.numel():
            step += 1
            stats = step % p["stats_every"] == 0
            need = 2 if stats else 1
            live = live[(oracle.remaining(rows[live]) >= need) & (source[live] >= p["convergence"])]
            if live.numel() == 0:
                break
            owners = rows[live]
            cand, orth = self._proposals(xr[live], out[live], spherical[live], source[live], generator)
            hit = oracle.decide(cand, owners)
            d_new = self.threat.distance(cand, xr[live])
            better = hit & (d_new < dist[live])
            out[live[better]] = cand[better]
            dist[live[better]] = d_new[better]
            if not stats:
                continue
            orth_hit = oracle.decide(orth, owners)
            _push(sph_hits, sph_len, live, orth_hit.to(dt), SPHERICAL_WINDOW)
            _push(step_hits, step_len, live, hit.to(dt), STEP_WINDOW)
            full = sph_len[live] >= SPHERICAL_WINDOW
            rate = sph_hits[live].mean(dim=1)
            grow, shrink = full & (rate > 0.5), full & (rate < 0.2)
            factor = torch.where(grow, p["step_adaptation"], torch.where(shrink, 1.0 / p["step_adaptation"], 1.0))
            spherical[live] *= factor.to(dt)
            source[live] *= factor.to(dt)
            sph_len[live[grow | shrink]] = 0
            full = step_len[live] >= STEP_WINDOW
            rate = step_hits[live].mean(dim=1)
            grow, shrink = full & (rate > 0.25), full & (rate < 0.1)
            factor = torch.where(grow, p["step_adaptation"], torch.where(shrink, 1.0 / p["step_adaptation"], 1.0))
            source[live] *= factor.to(dt)
            step_len[live[grow | shrink]] = 0
        return out


def _push(window: torch.Tensor, length: torch.Tensor, at: torch.Tensor, values: torch.Tensor, size: int) -> None:
    """Append ``values`` to the rolling windows of rows ``at`` (the oldest entry is overwritten)."""
    window[at, length[at] % size] = values
    length[at] += 1
