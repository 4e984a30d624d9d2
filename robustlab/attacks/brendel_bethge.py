"""The Brendel-Bethge attack (Brendel, Rauber, Kümmerer, Ustyuzhaninov & Bethge 2019, "Accurate,
reliable and fast robustness evaluation"), L2 and Linf.

A gradient-based minimum-norm attack that walks along the decision boundary. It starts from a
misclassified point (blended uniform noise, as HopSkipJump and the Boundary attack start, from the
model's labels), moves to the boundary by a binary search towards the clean image, and then
repeats: at the current point x, with ``b`` the gradient of the logit difference
``z_y - max_{j != y} z_j`` (averaged with the previous ones by ``momentum``) and ``c`` the change
that takes the linearized difference to ``-(overshoot - 1)`` times its value past the boundary, it
takes the step ``delta`` that solves the trust-region problem

    min ||x + delta - x0||_p   s.t.   b . delta = c,   ||delta||_2 <= r,   x + delta in the box,

with ``r = lr * d * (upper - lower)`` (d the input dimension) and ``lr`` decayed by ``lr_decay``
``lr_num_decay`` times over the run. The closest misclassified point seen is returned.

The subproblems are solved exactly, batched over samples:

- L2: for a multiplier ``mu >= 0`` of the trust region the problem is the projection of
  ``(x0 - x) / (1 + mu)`` onto the hyperplane within the box (FAB's exact projection,
  :func:`robustlab.attacks.fab.min_norm_to_hyperplane`); ``mu`` is found by bisection so that the
  step meets the trust region;
- Linf: bisection on the Linf radius eps of the answer; a radius is feasible if the hyperplane meets
  the box ``x0 +- eps`` (within the pixel box) at a point within the trust region (the L2-smallest
  such point, ``clip(lam * b)``, ``lam`` by bisection).
- L1 and L0: through the Lagrangian, which separates per coordinate (L1: a soft threshold; L0: keep
  the clean value or move, whichever is cheaper); the hyperplane's multiplier and the trust
  region's weight are found by nested bisection (:meth:`BrendelBethge._step_lagrangian`), and each
  candidate step is put exactly on the hyperplane by changing only the coordinates it already moves
  (:func:`_onto_plane`); a step counts only if it then lies on the hyperplane and in the trust
  region. For L1 (convex) that is the subproblem's solution; for L0 (not convex) a solution of its
  Lagrangian relaxation, which with a slack trust region is the exact answer of the linear problem
  (the coordinates with the largest reach first). L0 counts changed values of the flat input in the
  subproblem, changed pixels (:mod:`robustlab.threat`) in the result.

When the linearized boundary cannot be reached within the trust region, the step goes as far
towards it as the trust region allows. A point counts as adversarial only with a logit-gap margin
(:data:`MARGIN`), so that a returned point keeps its label under another batch or memory layout of
the same model; the returned points are verified by one last query. One gradient and one forward
per step and sample, plus the label queries of the start; all counted per sample.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.fab import min_norm_to_hyperplane
from robustlab.attacks.hopskipjump import _LabelOracle, blended_start
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError

#: Bisection rounds of the subproblem solvers (float64: 2^-50 of the initial bracket).
ROUNDS = 50
#: L1 and L0 (:meth:`BrendelBethge._step_lagrangian`): bisection rounds on the hyperplane multiplier
#: and on the log of the trust-region weight, and that weight's range relative to the box. The step
#: is touched onto the hyperplane afterwards (:func:`_onto_plane`), so the multiplier only needs to
#: find the set of moved coordinates (30 rounds: 1e-9 of its bracket), and the weight is found to 1%
#: (12 rounds over 27.6 in log): 40 and 20 rounds cost 1.8x the solver time for the same points
#: (10 MNIST points in L0: 9 of 10 equal, one 4 instead of 5 pixels).
T_ROUNDS = 30
TAU_ROUNDS = 12
TAU_MIN, TAU_MAX = 1e-9, 1e3
#: Times the bracket of the hyperplane multiplier may grow (4x each) before its bisection.
T_GROW = 20

#: The logit-gap margin a point needs to count as adversarial, relative to its largest logit (at
#: least 1). The walk converges onto the decision boundary; a point whose gap is a rounding error
#: below zero flips when the same model runs in another memory layout or batch (measured: gaps of
#: -1e-7 to -6e-6 on MNIST logits of about 10 flipped under the plain model). The walk aims at twice
#: the margin and records only points past it, so every returned point keeps its label under any
#: view of the model; the cost is a gap of about 1e-3, far below the norms' resolution.
MARGIN = 1e-4


def safety_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per sample the gap margin of :data:`MARGIN` (``MARGIN * max(1, max_j |z_j|)``)."""
    return MARGIN * logits.detach().abs().amax(dim=1).clamp_min(1.0)


def _logit_gap(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per sample z_y - max_{j != y} z_j (targeted: max_{j != t} z_j - z_t): < 0 means adversarial."""
    own = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return other - own if targeted else own - other


def _hyperplane_box_min_l2(b: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple:
    """Per row the L2-smallest ``d`` with ``b . d = c`` and ``lo <= d <= hi`` (``lo <= hi``, the box
    need not contain 0): ``d = clip(lam * b, lo, hi)``, ``b . d`` non-decreasing in lam, lam by
    bisection. Returns (d, feasible)."""
    reach_lo = (b * torch.where(b > 0, lo, hi)).sum(dim=1)
    reach_hi = (b * torch.where(b > 0, hi, lo)).sum(dim=1)
    feasible = (reach_lo <= c) & (c <= reach_hi)
    bmax = b.abs().amax(dim=1).clamp_min(1e-30)
    span = (hi - lo).abs().amax(dim=1) + lo.abs().amax(dim=1) + hi.abs().amax(dim=1)
    top = (span / bmax + 1.0).unsqueeze(1)
    low, high = -top, top.clone()
    for _ in range(ROUNDS):
        mid = (low + high) / 2
        val = (b * torch.minimum(torch.maximum(mid * b, lo), hi)).sum(dim=1, keepdim=True)
        below = val < c.unsqueeze(1)
        low = torch.where(below, mid, low)
        high = torch.where(below, high, mid)
    d = torch.minimum(torch.maximum(high * b, lo), hi)
    return d, feasible


def _onto_plane(delta, d, b, c, lo, hi) -> tuple:
    """Move ``delta`` onto the hyperplane ``b . delta = c`` by the L2-smallest change of the
    coordinates that differ from ``d`` (the ones the step already moves), within the box. Returns
    (the step, whether it reaches the hyperplane). The change keeps the step's set of moved
    coordinates, so its L0 count too; the L1 and L0 solvers' bisection otherwise leaves a residual
    (L0: ``b . delta`` jumps as coordinates switch)."""
    moved = (delta - d).abs() > 1e-12
    resid = c - (b * delta).sum(dim=1)
    zero = torch.zeros_like(delta)
    fix, ok = _hyperplane_box_min_l2(b, resid, torch.where(moved, lo - delta, zero),
                                     torch.where(moved, hi - delta, zero))
    ok |= resid.abs() <= 1e-9 * (1 + c.abs())
    return delta + torch.where(ok.unsqueeze(1), fix, zero), ok


@register_attack
class BrendelBethge(Attack):
    """Brendel-Bethge, L2, Linf, L1 and L0, white-box, minimum-norm.

    steps: boundary steps; lr: trust-region size (relative, see the module docstring); lr_decay,
    lr_num_decay: its schedule; momentum: averaging of the boundary normal; overshoot: how far past
    the linearized boundary each step aims; binary_steps: bisection of the first boundary point;
    init_trials: uniform noise images tried per sample for a starting point.
    """

    name = "brendel-bethge"
    norms = ("l2", "linf", "l1", "l0")
    minimum_norm = True
    defaults = {
        "steps": 1000, "lr": 1e-3, "lr_decay": 0.5, "lr_num_decay": 20, "momentum": 0.8, "overshoot": 1.1,
        "binary_steps": 10, "init_trials": 100,
    }

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("lr_num_decay", "binary_steps", "init_trials"):
            if p[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {p[key]}")
        if not p["lr"] > 0:
            raise RobustlabError(f"attack {self.name!r}: lr must be > 0, got {p['lr']}")
        if not 0 < p["lr_decay"] <= 1:
            raise RobustlabError(f"attack {self.name!r}: lr_decay must be in (0, 1], got {p['lr_decay']}")
        if not 0 <= p["momentum"] < 1:
            raise RobustlabError(f"attack {self.name!r}: momentum must be in [0, 1), got {p['momentum']}")
        if not 1 <= p["overshoot"] < 2:
            raise RobustlabError(f"attack {self.name!r}: overshoot must be in [1, 2), got {p['overshoot']}")

    # ------------------------------------------------------------------ subproblems (flat, float64)

    def _toward(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Points between x0 (t = 0) and x1 (t = 1): L2 the blend; Linf x1 clipped to the Linf ball
        of radius t * ||x1 - x0||_inf around x0; L1 every change soft-thresholded by (1 - t) times
        the largest; L0 x1's values where the change is at most t times the largest, x0's elsewhere."""
        t = t.view(-1, *[1] * (x0.dim() - 1))
        norm = self.threat.norm
        if norm == "l2":
            return (1 - t) * x0 + t * x1
        diff = x1 - x0
        top = diff.flatten(1).abs().amax(dim=1).view_as(t)
        if norm == "l1":  # every change shrunk by the same amount (soft threshold (1 - t) * max)
            return x0 + diff.sign() * (diff.abs() - (1 - t) * top).clamp_min(0)
        if norm == "l0":  # x1 where the change is at most t * max: fewer changed values near x0
            return torch.where(diff.abs() <= t * top, x1, x0)
        r = top * t
        return torch.minimum(torch.maximum(x1, x0 - r), x0 + r)

    @staticmethod
    def _toward_plane(b, c, lo, hi, r) -> torch.Tensor:
        """The L2-smallest step onto the hyperplane within the box, shortened to the trust region."""
        step = min_norm_to_hyperplane(b, c, lo, hi, "l2")
        size = step.norm(dim=1, keepdim=True)
        return step * (r.unsqueeze(1) / size.clamp_min(1e-30)).clamp(max=1.0)

    def _step_l2(self, d, b, c, lo, hi, r) -> torch.Tensor:
        """argmin ||delta - d||_2 s.t. b.delta = c, ||delta||_2 <= r, lo <= delta <= hi (d = x0 - x)."""

        def at(mu):
            a = d / (1 + mu).unsqueeze(1)
            return a + min_norm_to_hyperplane(b, c - (b * a).sum(dim=1), lo - a, hi - a, "l2")

        delta = at(torch.zeros_like(c))
        over = delta.norm(dim=1) > r
        if bool(over.any()):
            rows = over.nonzero(as_tuple=True)[0]
            br, cr, dr, lr_, hr, rr = b[rows], c[rows], d[rows], lo[rows], hi[rows], r[rows]
            closest = self._toward_plane(br, cr, lr_, hr, rr)
            reach = min_norm_to_hyperplane(br, cr, lr_, hr, "l2").norm(dim=1) <= rr
            low = torch.zeros_like(cr)
            high = torch.full_like(cr, 1.0)
            # Grow the upper bracket until the step fits (mu -> inf gives the smallest step).
            for _ in range(60):
                a = dr / (1 + high).unsqueeze(1)
                fits = (a + min_norm_to_hyperplane(br, cr - (br * a).sum(dim=1), lr_ - a, hr - a, "l2")).norm(dim=1) <= rr
                if bool((fits | ~reach).all()):
                    break
                high = torch.where(fits | ~reach, high, high * 4)
            for _ in range(ROUNDS):
                mid = (low + high) / 2
                a = dr / (1 + mid).unsqueeze(1)
                step = a + min_norm_to_hyperplane(br, cr - (br * a).sum(dim=1), lr_ - a, hr - a, "l2")
                fits = step.norm(dim=1) <= rr
                high = torch.where(fits, mid, high)
                low = torch.where(fits, low, mid)
            a = dr / (1 + high).unsqueeze(1)
            best = a + min_norm_to_hyperplane(br, cr - (br * a).sum(dim=1), lr_ - a, hr - a, "l2")
            delta[rows] = torch.where(reach.unsqueeze(1), best, closest)
        return delta

    def _step_linf(self, d, b, c, lo, hi, r) -> torch.Tensor:
        """argmin ||delta - d||_inf s.t. b.delta = c, ||delta||_2 <= r, lo <= delta <= hi."""
        closest = self._toward_plane(b, c, lo, hi, r)
        reach = min_norm_to_hyperplane(b, c, lo, hi, "l2").norm(dim=1) <= r
        dmax = d.abs().amax(dim=1)
        # Feasible at eps: the hyperplane meets [d - eps, d + eps] within the box at a point of
        # L2 norm <= r. At eps = ||d||_inf + 2 r the box around d holds the whole trust region.
        low = torch.zeros_like(c)
        high = dmax + 2 * r
        best = closest.clone()
        found = torch.zeros_like(reach)
        for _ in range(ROUNDS):
            mid = (low + high) / 2
            e = mid.unsqueeze(1)
            step, ok = _hyperplane_box_min_l2(b, c, torch.maximum(lo, d - e), torch.minimum(hi, d + e))
            ok &= step.norm(dim=1) <= r * (1 + 1e-9)
            best = torch.where(ok.unsqueeze(1), step, best)
            found |= ok
            high = torch.where(ok, mid, high)
            low = torch.where(ok, low, mid)
        return torch.where((reach & found).unsqueeze(1), best, closest)

    def _step_l1(self, d, b, c, lo, hi, r) -> torch.Tensor:
        """argmin ||delta - d||_1 s.t. b.delta = c, ||delta||_2 <= r, lo <= delta <= hi."""

        def coords(t, tau):  # the box-clipped prox of tau * |. - d| at t * b
            v = t * b - d
            return torch.minimum(torch.maximum(d + v.sign() * (v.abs() - tau).clamp_min(0), lo), hi)

        return self._step_lagrangian(coords, d, b, c, lo, hi, r)

    def _step_l0(self, d, b, c, lo, hi, r) -> torch.Tensor:
        """argmin #{i: delta_i != d_i} s.t. b.delta = c, ||delta||_2 <= r, lo <= delta <= hi
        (approximately: the Lagrangian's per-coordinate choice, see :meth:`_step_lagrangian`)."""

        def coords(t, tau):  # per coordinate: stay at d, or pay tau and move to clip(t * b)
            v = torch.minimum(torch.maximum(t * b, lo), hi)
            move = tau + 0.5 * v * v - t * b * v < 0.5 * d * d - t * b * d
            return torch.where(move, v, d)

        return self._step_lagrangian(coords, d, b, c, lo, hi, r)

    def _step_lagrangian(self, coords, d, b, c, lo, hi, r) -> torch.Tensor:
        """The L1 and L0 subproblems through their Lagrangian. With a multiplier mu > 0 of the trust
        region and lam of the hyperplane, each coordinate solves ``min_delta cost(delta - d) +
        mu / 2 delta^2 - lam b delta`` in its box; with ``tau = 1 / mu`` and ``t = lam / mu`` that is
        ``coords(t, tau)`` (L1: a soft threshold of ``t * b`` around ``d``; L0: stay at ``d`` or move
        to ``clip(t * b)``, whichever is cheaper). For a given tau, ``b . delta`` grows with t:
        bisection finds the t that meets the hyperplane (from the side of the larger |t|, which moves
        more coordinates and passes it), then :func:`_onto_plane` puts the step exactly on it by
        moving only the coordinates that already moved (L0: the count stays). A larger tau weighs the norm more against the step's L2 length: bisection on log tau
        finds the largest tau whose step is on the hyperplane and fits the trust region (tau -> 0 is
        the L2-smallest step onto the hyperplane)."""
        closest = self._toward_plane(b, c, lo, hi, r)
        reach = min_norm_to_hyperplane(b, c, lo, hi, "l2").norm(dim=1) <= r
        m = c.shape[0]
        span = (hi - lo).abs().amax(dim=1, keepdim=True)
        bmax = b.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        cc = c.unsqueeze(1)

        def on_plane(tau):
            # Bracket t: grow it until the step reaches the hyperplane (a coordinate whose room in the
            # box is small moves only at a large t), then bisect; the step is then touched up onto it.
            top = (span + tau + d.abs().amax(dim=1, keepdim=True)) / bmax
            for _ in range(T_GROW):
                short = ((b * coords(top, tau)).sum(dim=1, keepdim=True) < cc) | (
                    (b * coords(-top, tau)).sum(dim=1, keepdim=True) > cc)
                if not bool(short.any()):
                    break
                top = torch.where(short, top * 4, top)
            low, high = -top, top.clone()
            for _ in range(T_ROUNDS):
                mid = (low + high) / 2
                below = (b * coords(mid, tau)).sum(dim=1, keepdim=True) < cc
                low = torch.where(below, mid, low)
                high = torch.where(below, high, mid)
            # The side of the hyperplane with more coordinates moved (the larger |t|): its step
            # passes the hyperplane and _onto_plane pulls it back without adding coordinates.
            return _onto_plane(coords(torch.where(high > 0, high, low), tau), d, b, c, lo, hi)

        def valid(step, ok):
            return ok & (step.norm(dim=1) <= r * (1 + 1e-9))

        # tau in [TAU_MIN, TAU_MAX] * the scale of one coordinate's change; log-bisection.
        scale = span.clamp_min(1e-12)
        log_lo = torch.full((m, 1), TAU_MIN, dtype=d.dtype, device=d.device).log()
        log_hi = torch.full((m, 1), TAU_MAX, dtype=d.dtype, device=d.device).log()
        best, ok = on_plane(log_hi.exp() * scale)
        fits = valid(best, ok)
        open_ = ~fits
        if bool(open_.any()):
            fallback, ok = on_plane(log_lo.exp() * scale)
            fine = valid(fallback, ok)
            best = torch.where(fits.unsqueeze(1), best, torch.where(fine.unsqueeze(1), fallback, closest))
            for _ in range(TAU_ROUNDS):
                mid = (log_lo + log_hi) / 2
                step, ok = on_plane(mid.exp() * scale)
                ok = valid(step, ok) & open_
                best = torch.where(ok.unsqueeze(1), step, best)
                log_lo = torch.where(ok.unsqueeze(1), mid, log_lo)
                log_hi = torch.where(ok.unsqueeze(1) | ~open_.unsqueeze(1), log_hi, mid)
        return torch.where(reach.unsqueeze(1), best, closest)

    # ------------------------------------------------------------------ the attack

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n = x.shape[0]
        oracle = _LabelOracle(self, model, y, 1 << 62)
        x_best = x.clone()
        success, rows, start = blended_start(self, oracle, x, generator, p["init_trials"])
        gradients = torch.zeros(n, dtype=torch.long, device=x.device)
        if rows.numel() == 0:
            return AttackResult(x_best, success, gradients, oracle.queries)
        x0, yr = x[rows], y[rows]
        # To the boundary: bisection between the clean image and the start.
        low = torch.zeros(len(rows), dtype=x.dtype, device=x.device)
        high = torch.ones_like(low)
        for _ in range(p["binary_steps"]):
            mid = (low + high) / 2
            hit = oracle.decide(self._toward(x0, start, mid), rows)
            high = torch.where(hit, mid, high)
            low = torch.where(hit, low, mid)
        cur = self._toward(x0, start, high)
        best = start.clone()
        best_dist = self.threat.distance(start, x0)
        m, dim = len(rows), x[0].numel()
        lo_box, hi_box = self.threat.lower, self.threat.upper
        lr = torch.full((m,), float(p["lr"]), dtype=torch.float64, device=x.device)
        decay_every = max(1, p["steps"] // p["lr_num_decay"])
        region_scale = dim * (hi_box - lo_box)
        normal = None
        solve = {"l2": self._step_l2, "linf": self._step_linf, "l1": self._step_l1, "l0": self._step_l0}[self.threat.norm]
        x0f = x0.flatten(1).double()
        for step in range(1, p["steps"] + 1):
            cur_req = cur.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = check_logits(model(cur_req), m)
                gap = _logit_gap(logits, yr, self.targeted)
                (g,) = torch.autograd.grad(gap.sum(), cur_req)
            gradients[rows] += 1
            oracle.queries[rows] += 1
            gap = gap.detach()
            tol = safety_margin(logits)
            adv = gap < -tol
            dist = self.threat.distance(cur.detach(), x0)
            closer = adv & (dist < best_dist)
            best[closer] = cur.detach()[closer]
            best_dist = torch.where(closer, dist, best_dist)
            if step == p["steps"]:
                break
            gf = g.flatten(1).double()
            normal = gf if normal is None else (1 - p["momentum"]) * gf + p["momentum"] * normal
            if (step + 1) % decay_every == 0:
                lr = lr * p["lr_decay"]
            gap64 = (gap + 2 * tol).double()  # aim past the margin, see MARGIN
            c = torch.where(gap64 > 0, -p["overshoot"] * gap64, -(2 - p["overshoot"]) * gap64)
            xf = cur.detach().flatten(1).double()
            delta = solve(x0f - xf, normal, c, lo_box - xf, hi_box - xf, lr * region_scale)
            cur = (xf + delta).clamp(lo_box, hi_box).to(x.dtype).view_as(x0)
        x_best[rows] = best
        # The contract: success is the label of the returned point (one more query per sample).
        success[rows] = oracle.decide(best, rows)
        return AttackResult(x_best, success, gradients, oracle.queries)
