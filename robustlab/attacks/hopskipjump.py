"""HopSkipJump (Chen, Jordan & Wainwright 2020, "HopSkipJumpAttack: a query-efficient decision-based
attack"), in L2 and Linf.

Decision-based: the attack sees only whether a point is adversarial (the predicted label). It starts
from a misclassified point (uniform noise images, drawn until one is misclassified, then blended
towards the clean image), walks to the decision boundary by binary search, and then repeats:

1. estimate the boundary's normal at the current boundary point from the signs of ``B_t`` random
   probes at radius ``delta`` (``B_t = init_evals * sqrt(t)``, at most ``max_evals``), with the mean
   sign as a baseline;
2. step along it (L2: the unit estimate; Linf: its sign) with a geometric step-size search starting
   at ``||x_t - x*|| / sqrt(t)`` and halving until the point is adversarial;
3. binary search back to the boundary between the clean image and that point.

It is a minimum-norm attack: it returns the closest adversarial point found (always one the model
was seen to misclassify), which may lie outside eps; the evaluation counts it only inside the ball.

All samples of a batch move in lock-step, with the probes of all samples in one batch (fed to the
model in calls of a size that suits the device); a sample stops querying the moment its phase is
over or its budget is spent, and per-sample query counts are exact (every image sent to the model
is one query).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.spsa import MAX_QUERY_ELEMENTS, query_logits
from robustlab.errors import RobustlabError

#: Halvings of the step size before the geometric search gives up for this iteration.
MAX_HALVINGS = 30
#: Resolution of the initial blend between the clean image and the random starting point.
BLEND_TOLERANCE = 1e-3


class _LabelOracle:
    """The model seen through labels only: ``decide`` says per point whether it is adversarial for
    its owning sample and charges that sample one query; ``remaining`` is each sample's budget left."""

    def __init__(self, attack: Attack, model: nn.Module, y: torch.Tensor, budget: int) -> None:
        self.attack, self.model, self.y, self.budget = attack, model, y, budget
        self.queries = torch.zeros(len(y), dtype=torch.long, device=y.device)

    def decide(self, points: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        if points.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=points.device)
        hit = self.attack.is_success(query_logits(self.attack, self.model, points), self.y[owners])
        self.queries.index_add_(0, owners, torch.ones_like(owners))
        return hit

    def remaining(self, rows: torch.Tensor) -> torch.Tensor:
        return self.budget - self.queries[rows]


@register_attack
class HopSkipJump(Attack):
    """HopSkipJump, L2 or Linf, decision-based, minimum-norm.

    queries: label queries per sample (the budget; never exceeded); init_evals: probes for the first
    gradient estimate (then ``init_evals * sqrt(t)`` at iteration t); max_evals: cap on the probes
    per estimate; gamma: sets the binary-search tolerance ``theta = gamma / d^(3/2)`` (L2) or
    ``gamma / d^2`` (Linf), d the input dimension, and with it the probe radius; init_trials: uniform
    noise images tried per sample to find a misclassified starting point (a sample with none stays
    unbroken).
    """

    name = "hopskipjump"
    norms = ("l2", "linf")
    kind = "decision-based"
    minimum_norm = True
    defaults = {"queries": 5000, "init_evals": 100, "max_evals": 10000, "gamma": 1.0, "init_trials": 100}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("queries", "init_evals", "max_evals", "init_trials"):
            if p[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {p[key]}")
        if not p["gamma"] > 0:
            raise RobustlabError(f"attack {self.name!r}: gamma must be > 0, got {p['gamma']}")

    # ------------------------------------------------------------------ geometry

    def _toward(self, x: torch.Tensor, adv: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The point at parameter ``t`` on the way from ``x`` (t = 0) to ``adv``: L2 the blend
        ``(1 - t) x + t adv`` (t in [0, 1]); Linf ``adv`` clipped to the Linf ball of radius t."""
        t = t.view(-1, *[1] * (x.dim() - 1))
        if self.threat.norm == "l2":
            return (1 - t) * x + t * adv
        return torch.minimum(torch.maximum(adv, x - t), x + t)

    def _binary_search(
        self, oracle: _LabelOracle, rows: torch.Tensor, x: torch.Tensor, adv: torch.Tensor, theta: float
    ) -> torch.Tensor:
        """Boundary points between ``x`` (not adversarial) and ``adv`` (adversarial), per sample: the
        adversarial end of the final bracket, a point the model was seen to misclassify."""
        if self.threat.norm == "l2":
            high = torch.ones(len(rows), dtype=x.dtype, device=x.device)
            tol = torch.full_like(high, theta)
        else:
            high = self.threat.distance(adv, x).to(x.dtype)
            tol = torch.clamp(high * theta, max=theta)
        low = torch.zeros_like(high)
        best = adv.clone()
        while True:
            open_ = ((high - low) > tol) & (oracle.remaining(rows) > 0)
            if not bool(open_.any()):
                return best
            sel = open_.nonzero(as_tuple=True)[0]
            mid = (low[sel] + high[sel]) / 2
            # A bracket narrower than the float resolution cannot shrink further: close it.
            stuck = (mid <= low[sel]) | (mid >= high[sel])
            if bool(stuck.any()):
                low[sel[stuck]] = high[sel[stuck]]
                sel, mid = sel[~stuck], mid[~stuck]
                if sel.numel() == 0:
                    continue
            points = self._toward(x[sel], adv[sel], mid)
            hit = oracle.decide(points, rows[sel])
            high[sel] = torch.where(hit, mid, high[sel])
            low[sel] = torch.where(hit, low[sel], mid)
            best[sel[hit]] = points[hit]

    def _estimate_direction(
        self, oracle: _LabelOracle, rows: torch.Tensor, cur: torch.Tensor, delta: torch.Tensor, counts: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Unit estimate of the boundary normal (pointing to the adversarial side) at each ``cur``
        from ``counts[i]`` sign probes at radius ``delta[i]``; samples in groups that bound memory."""
        step = max(1, MAX_QUERY_ELEMENTS // (int(counts.max()) * cur[0].numel()))
        return torch.cat([
            self._estimate_group(oracle, rows[i : i + step], cur[i : i + step], delta[i : i + step],
                                 counts[i : i + step], generator)
            for i in range(0, cur.shape[0], step)
        ])

    def _estimate_group(
        self, oracle: _LabelOracle, rows: torch.Tensor, cur: torch.Tensor, delta: torch.Tensor, counts: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        m, shape = cur.shape[0], cur.shape[1:]
        k_max = int(counts.max())
        kw = dict(device=cur.device, generator=generator)
        if self.threat.norm == "l2":
            rv = torch.randn((m, k_max, *shape), dtype=cur.dtype, **kw)
        else:
            rv = torch.rand((m, k_max, *shape), dtype=cur.dtype, **kw).mul_(2).sub_(1)
        ones = [1] * len(shape)
        rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).view(m, k_max, *ones)
        probes = (cur.unsqueeze(1) + delta.view(m, 1, *ones) * rv).clamp_(self.threat.lower, self.threat.upper)
        rv = (probes - cur.unsqueeze(1)) / delta.view(m, 1, *ones)
        used = torch.arange(k_max, device=cur.device).unsqueeze(0) < counts.unsqueeze(1)
        owners = rows.unsqueeze(1).expand(m, k_max)[used]
        hit = oracle.decide(probes[used], owners)
        fval = torch.zeros(m, k_max, dtype=cur.dtype, device=cur.device)
        fval[used] = hit.to(cur.dtype) * 2 - 1
        mean = fval.sum(dim=1, keepdim=True) / counts.unsqueeze(1)
        # The mean sign is the baseline, unless every probe agreed (then it would cancel everything).
        unanimous = mean.abs() == 1
        centered = torch.where(unanimous, fval, fval - mean) * used
        grad = (centered.view(m, k_max, *ones) * rv).sum(dim=1) / counts.view(m, *ones)
        return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(m, *ones)

    # ------------------------------------------------------------------ the attack

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        oracle = _LabelOracle(self, model, y, self.params["queries"])
        x_best, success = self._search(oracle, x, generator)
        return AttackResult(x_best, success, torch.zeros_like(oracle.queries), oracle.queries)

    def _search(self, oracle: _LabelOracle, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        d = x[0].numel()
        theta = p["gamma"] / (d * math.sqrt(d)) if self.threat.norm == "l2" else p["gamma"] / d**2
        x_best = x.clone()
        success, rows, cur = blended_start(self, oracle, x, generator, p["init_trials"])
        if rows.numel() == 0:
            return x_best, success
        xr = x[rows]
        # 2. To the boundary, then the HopSkipJump iterations.
        dist_before = self.threat.distance(cur, xr)
        cur = self._binary_search(oracle, rows, xr, cur, theta)
        dist = self.threat.distance(cur, xr)
        x_best[rows] = cur
        best_dist = dist.clone()
        # Queries a full iteration needs beyond the probes: the binary search and a step or two.
        reserve = math.ceil(math.log2(1.0 / theta)) + 2
        t = 0
        while rows.numel():
            t += 1
            planned = min(int(p["init_evals"] * math.sqrt(t)), p["max_evals"])
            counts = torch.clamp(oracle.remaining(rows) - reserve, max=planned)
            keep = counts >= 1
            if not bool(keep.all()):
                rows, xr, cur, dist, dist_before, best_dist, counts = (
                    v[keep] for v in (rows, xr, cur, dist, dist_before, best_dist, counts)
                )
                if rows.numel() == 0:
                    break
            if t == 1:
                delta = torch.full_like(dist, 0.1 * (self.threat.upper - self.threat.lower))
            else:
                delta = (p["gamma"] / d) * dist_before
            delta = delta.clamp_min(1e-12)
            grad = self._estimate_direction(oracle, rows, cur, delta, counts, generator)
            update = grad.sign() if self.threat.norm == "linf" else grad
            # Geometric step-size search: halve until the stepped point is adversarial.
            size = dist / math.sqrt(t)
            moved = cur.clone()
            searching = oracle.remaining(rows) > 0
            for _ in range(MAX_HALVINGS):
                sel = searching.nonzero(as_tuple=True)[0]
                if sel.numel() == 0:
                    break
                cand = (cur[sel] + size[sel].view(-1, *[1] * (x.dim() - 1)) * update[sel]).clamp(
                    self.threat.lower, self.threat.upper
                )
                hit = oracle.decide(cand, rows[sel])
                moved[sel[hit]] = cand[hit]
                size[sel[~hit]] /= 2
                searching[sel[hit]] = False
                searching &= oracle.remaining(rows) > 0
            dist_before = self.threat.distance(moved, xr)
            cur = self._binary_search(oracle, rows, xr, moved, theta)
            dist = self.threat.distance(cur, xr)
            better = dist < best_dist
            x_best[rows[better]] = cur[better]
            best_dist = torch.where(better, dist, best_dist)
        return x_best, success


def blended_start(
    attack: Attack, oracle: _LabelOracle, x: torch.Tensor, generator: torch.Generator | None, trials: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The starting point of the decision-based attacks (HopSkipJump, Boundary): a misclassified
    point per sample, found from labels alone. Uniform noise images are tried one query at a time
    (at most ``trials`` per sample), and each one found is blended towards the clean image (line
    search, tolerance ``BLEND_TOLERANCE``).

    Returns (success: the samples that are adversarial already or got a start; rows: those that got
    a start and were not adversarial to begin with; their blended starting points, aligned with rows).
    """
    threat = attack.threat
    all_rows = torch.arange(x.shape[0], device=x.device)
    # Points that are already adversarial need nothing else.
    success = oracle.decide(x, all_rows)
    start = x.clone()
    found = success.clone()
    for _ in range(trials):
        need = (~found & (oracle.remaining(all_rows) > 0)).nonzero(as_tuple=True)[0]
        if need.numel() == 0:
            break
        noise = torch.rand((need.numel(), *x.shape[1:]), dtype=x.dtype, device=x.device, generator=generator)
        noise = noise * (threat.upper - threat.lower) + threat.lower
        hit = oracle.decide(noise, need)
        start[need[hit]] = noise[hit]
        found[need[hit]] = True
    rows = (found & ~success).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return success, rows, x[rows]
    xr = x[rows]
    low = torch.zeros(len(rows), dtype=x.dtype, device=x.device)
    high = torch.ones_like(low)
    cur = start[rows]
    while True:
        open_ = ((high - low) > BLEND_TOLERANCE) & (oracle.remaining(rows) > 0)
        if not bool(open_.any()):
            break
        sel = open_.nonzero(as_tuple=True)[0]
        mid = (low[sel] + high[sel]) / 2
        t = mid.view(-1, *[1] * (x.dim() - 1))
        points = (1 - t) * xr[sel] + t * start[rows[sel]]
        hit = oracle.decide(points, rows[sel])
        high[sel] = torch.where(hit, mid, high[sel])
        low[sel] = torch.where(hit, low[sel], mid)
        cur[sel[hit]] = points[hit]
    success[rows] = True
    return success, rows, cur
