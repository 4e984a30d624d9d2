"""FAB, the fast adaptive boundary attack (Croce & Hein 2020), in Linf, L2 and L1.

Each step linearizes the classifier at the current iterate ``x_i``, picks the class ``s`` whose
linearized decision boundary is closest (``|f_s| / ||grad f_s||_q``, ``f_s = z_s - z_y``, ``q`` the
dual norm), and computes the minimal-norm steps onto that hyperplane *within the box*, both from
``x_i`` (``d_i``) and from the clean point ``x_0`` (``d_0``) (:func:`min_norm_to_hyperplane`, the
paper's exact projection). The next iterate is the biased combination

    x_{i+1} = clip((1 - a) (x_i + eta d_i) + a (x_0 + eta d_0)),  a = min(|d_i| / (|d_i| + |d_0|), alpha_max),

and whenever it is misclassified it is recorded (if closer than the best so far) and pulled back
towards the clean point, ``x_{i+1} <- x_0 + beta (x_{i+1} - x_0)``, so the search keeps shrinking
the perturbation along the boundary. Restarts after the first start at random points at distance up
to ``min(best found, eps) / 2``.

Registered names (all untargeted in the contract: labels are the true classes, success means
misclassified):

- ``fab``: fixed budget. A sample stops as soon as a misclassified point within eps is found;
  otherwise the closest misclassified point found (or the last iterate) is projected onto the ball
  and checked once more. Every returned point is inside the threat model.
- ``fab-t``: the same with the targeted version of FAB (only the boundary with one target class is
  linearized: one input gradient per step instead of one per class), run for each of the
  ``n_target_classes`` classes with the largest clean logits in turn, each time on the samples still
  robust at eps (AutoAttack's FAB-T).
- ``fab-min``, ``fab-t-min``: minimum-norm versions (``minimum_norm = True``): every step runs on
  every sample and the smallest misclassifying perturbation found is returned, wherever it lies
  (``success`` = misclassified; the evaluation counts it only inside eps). eps only scales the
  random restarts. FAB's best point lies a little beyond the boundary (the overshoot eta and the
  backward step beta leave a gap of ~0.5% on a linear model); ``line_search`` bisection steps on
  the segment from the clean point (forward passes only, not in the paper; 0 turns them off) close
  most of it.

Costs per step and sample: one forward pass and K - 1 input gradients (untargeted, K classes) or 1
(targeted), plus one forward pass on the steps where some samples of the batch were misclassified
(they move, so the linearization is recomputed on the moved points); one forward pass on the clean
batch and one on each run's last iterate; fixed budget: one more on the projected point of each
sample not broken inside the ball; minimum-norm: ``line_search`` on each sample found.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import bisect_to_boundary, forward_for_gradients, margin_gradients, top_other_classes
from robustlab.errors import RobustlabError
from robustlab.threat import NORMS, norms, sample_ball


def min_norm_to_hyperplane(
    w: torch.Tensor, r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, norm: str
) -> torch.Tensor:
    """Per row, the smallest ``d`` in ``norm`` with ``<w, d> = r`` and ``lo <= d <= hi``.

    w, lo, hi: (N, D) with ``lo <= 0 <= hi`` (the box seen from the point being projected); r: (N,).
    Only moving coordinate i in the direction ``sign(w_i r)`` helps, so with ``t_i = |d_i|`` and
    ``a_i = |w_i|`` the problem is ``min ||t|| s.t. sum a_i t_i = |r|, 0 <= t_i <= cap_i``, solved
    exactly by sorting (the paper's projection):

    - l2: ``t_i = min(lam a_i, cap_i)`` (KKT), lam found on the sorted breakpoints ``cap_i / a_i``;
    - linf: ``t_i = min(tau, cap_i)`` on coordinates with ``a_i > 0``, tau on the sorted ``cap_i``;
    - l1: fill the coordinates with the largest ``a_i`` first (the cheapest per unit of norm).

    If the box cannot reach the hyperplane, every useful coordinate goes to its bound (the box corner
    closest to the hyperplane). Computed in float32 (float64 for float64 input); returns ``d`` in the
    dtype of ``w``.
    """
    dtype = w.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w, r, lo, hi = (t.to(work) for t in (w, r, lo, hi))
    w = w * torch.where(r < 0, -1.0, 1.0).unsqueeze(1)  # now <w, d> must reach |r| >= 0
    target = r.abs()
    a = w.abs()
    cap = torch.where(w > 0, hi, torch.where(w < 0, -lo, torch.zeros_like(lo))).clamp_min(0)
    t = cap.clone()
    feasible = (a * cap).sum(dim=1) > target
    if bool(feasible.any()):
        rows = feasible.nonzero(as_tuple=True)[0]
        t[rows] = _solve_magnitudes(a[rows], cap[rows], target[rows], norm)
    return (w.sign() * t).to(dtype)


def _exclusive_cumsum(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(v[:, :1]), v.cumsum(dim=1)[:, :-1]], dim=1)


def _solve_magnitudes(a: torch.Tensor, cap: torch.Tensor, target: torch.Tensor, norm: str) -> torch.Tensor:
    """Rows where sum(a * cap) > target >= 0: the magnitudes t of :func:`min_norm_to_hyperplane`."""
    target = target.unsqueeze(1)
    inf = torch.full_like(a, float("inf"))
    if norm == "l1":
        order = a.argsort(dim=1, descending=True)
        a_s, cap_s = a.gather(1, order), cap.gather(1, order)
        gain = a_s * cap_s
        filled = gain.cumsum(dim=1)
        k = (filled < target).sum(dim=1, keepdim=True)  # the coordinate that is filled partially
        before = filled.gather(1, k) - gain.gather(1, k)
        part = ((target - before) / a_s.gather(1, k).clamp_min(1e-300)).clamp(min=0)
        part = torch.minimum(part, cap_s.gather(1, k))
        pos = torch.arange(a.shape[1], device=a.device).unsqueeze(0)
        t_s = torch.where(pos < k, cap_s, torch.zeros_like(cap_s)).scatter(1, k, part)
        return torch.zeros_like(t_s).scatter(1, order, t_s)
    if norm == "l2":
        # h(lam) = sum a_i min(lam a_i, cap_i); coordinate i saturates at lam = cap_i / a_i.
        brk = torch.where(a > 0, cap / a.clamp_min(1e-300), inf)
        order = brk.argsort(dim=1)
        brk_s, a_s, cap_s = brk.gather(1, order), a.gather(1, order), cap.gather(1, order)
        sat = _exclusive_cumsum(a_s * cap_s)  # from the coordinates saturated before breakpoint k
        slope = a_s.square().flip(1).cumsum(dim=1).flip(1)  # sum of a^2 over the free ones
        finite = torch.isfinite(brk_s)
        h = torch.where(finite, sat + torch.where(finite, brk_s, 0.0) * slope, inf)
        k = (h < target).sum(dim=1, keepdim=True)
        lam = (target - sat.gather(1, k)).clamp_min(0) / slope.gather(1, k).clamp_min(1e-300)
        return torch.minimum(lam * a, cap)
    if norm == "linf":
        # h(tau) = sum a_i min(tau, cap_i) over a_i > 0; breakpoints at cap_i.
        brk = torch.where(a > 0, cap, inf)
        order = brk.argsort(dim=1)
        brk_s, a_s = brk.gather(1, order), a.gather(1, order)
        finite = torch.isfinite(brk_s)
        sat = _exclusive_cumsum(a_s * torch.where(finite, brk_s, 0.0))
        slope = a_s.flip(1).cumsum(dim=1).flip(1)
        h = torch.where(finite, sat + torch.where(finite, brk_s, 0.0) * slope, inf)
        k = (h < target).sum(dim=1, keepdim=True)
        tau = (target - sat.gather(1, k)).clamp_min(0) / slope.gather(1, k).clamp_min(1e-300)
        return torch.where(a > 0, torch.minimum(tau.expand_as(cap), cap), torch.zeros_like(cap))
    raise RobustlabError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def _dual_norms(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Norms of the last dimension in the dual of ``norm``."""
    if norm == "linf":
        return g.abs().sum(dim=-1)
    if norm == "l2":
        return g.norm(p=2, dim=-1)
    return g.abs().amax(dim=-1)


class _Search:
    """Per-sample state shared by the runs of one batch: the best point found and the costs."""

    def __init__(self, x: torch.Tensor) -> None:
        n, dev = x.shape[0], x.device
        self.best = x.clone()
        self.best_norm = torch.full((n,), float("inf"), dtype=x.dtype, device=dev)
        self.last = x.clone()
        self.grads = torch.zeros(n, dtype=torch.long, device=dev)
        self.forwards = torch.zeros(n, dtype=torch.long, device=dev)


@register_attack
class FAB(Attack):
    """FAB at a fixed budget (untargeted; see the module docstring for ``fab-t`` and ``-min``).

    steps: iterations per run; restarts: runs per target (the first from the clean point, the
    others from random points); alpha_max: the largest weight of the step from the clean point;
    eta: overshoot of each projection onto the linearized boundary; beta: the backward step towards
    the clean point after a success.
    """

    name = "fab"
    defaults = {"steps": 100, "restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
    norms = NORMS
    multi_targeted = False

    def validate(self) -> None:
        super().validate()
        p = self.params
        if self.targeted:
            raise RobustlabError(
                f"attack {self.name!r} takes the true labels (targeted=False); "
                "use fab-t to attack the most likely other classes"
            )
        if not 0.0 <= p["alpha_max"] <= 1.0:
            raise RobustlabError(f"attack {self.name!r}: alpha_max must be in [0, 1], got {p['alpha_max']}")
        if not p["eta"] > 0:
            raise RobustlabError(f"attack {self.name!r}: eta must be > 0, got {p['eta']}")
        if not 0.0 < p["beta"] <= 1.0:
            raise RobustlabError(f"attack {self.name!r}: beta must be in (0, 1], got {p['beta']}")
        if p.get("line_search", 0) < 0:
            raise RobustlabError(f"attack {self.name!r}: line_search must be >= 0, got {p['line_search']}")
        if "n_target_classes" in p and p["n_target_classes"] < 1:
            raise RobustlabError(f"attack {self.name!r}: n_target_classes must be >= 1, got {p['n_target_classes']}")

    # ------------------------------------------------------------------ driver

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        eps, norm = self.threat.eps, self.threat.norm
        st = _Search(x)
        logits = self.logits(model, x)
        st.forwards += 1
        wrong = logits.argmax(dim=1) != y
        st.best_norm[wrong] = 0.0
        num_classes = logits.shape[1]
        if self.multi_targeted:
            targets = top_other_classes(logits, y, min(p["n_target_classes"], num_classes - 1))
            plan = [targets[:, k] for k in range(targets.shape[1])]
            others = None
        else:
            plan = [None]
            others = top_other_classes(logits, y, num_classes - 1)
        if self.minimum_norm or eps > 0:
            for target in plan:
                for restart in range(p["restarts"]):
                    # Minimum-norm: every sample not already misclassified; fixed budget: the robust ones.
                    todo = st.best_norm > 0 if self.minimum_norm else st.best_norm > eps
                    idx = todo.nonzero(as_tuple=True)[0]
                    if idx.numel() == 0:
                        break
                    start = x[idx] if restart == 0 else self._random_start(x[idx], st.best_norm[idx], generator)
                    cls = target[idx].unsqueeze(1) if target is not None else others[idx]
                    self._run(model, x, y, idx, start, cls, st)
        found = torch.isfinite(st.best_norm)
        if self.minimum_norm:
            # FAB stops a little beyond the boundary (eta, beta): bisect back onto it.
            bisect_to_boundary(model, x, y, st.best, st.best_norm, norm, p.get("line_search", 0),
                               lambda logits, labels: logits.argmax(dim=1) != labels, st.forwards)
            return AttackResult(st.best, found, st.grads, st.forwards)
        success = st.best_norm <= eps
        x_adv = st.best.clone()
        rest = (~success).nonzero(as_tuple=True)[0]
        if rest.numel():
            # The closest misclassified point outside the ball (else the last iterate), projected.
            cand = torch.where(found[rest].view(-1, *[1] * (x.dim() - 1)), st.best[rest], st.last[rest])
            cand = self.threat.project(cand, x[rest])
            st.forwards[rest] += 1
            x_adv[rest] = cand
            success[rest] = self.logits(model, cand).argmax(dim=1) != y[rest]
        return AttackResult(x_adv, success, st.grads, st.forwards)

    def _random_start(self, x0: torch.Tensor, best_norm: torch.Tensor, generator) -> torch.Tensor:
        """Uniform in the ball of radius ``min(best found, eps) / 2`` (eps = 0: best / 2; none: x0)."""
        eps = self.threat.eps
        radius = torch.minimum(best_norm, torch.full_like(best_norm, eps)) if eps > 0 else best_norm
        radius = torch.where(torch.isfinite(radius), 0.5 * radius, torch.zeros_like(radius))
        unit = sample_ball(x0.shape, self.threat.norm, 1.0, x0.device, x0.dtype, generator)
        return (x0 + unit * radius.view(-1, *[1] * (x0.dim() - 1))).clamp(self.threat.lower, self.threat.upper)

    # ------------------------------------------------------------------ one run

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        x_cur: torch.Tensor,
        classes: torch.Tensor,
        st: _Search,
    ) -> None:
        """``steps`` FAB steps from ``x_cur`` on the samples ``idx``, linearizing the boundaries with
        the classes in ``classes`` (N, m); updates ``st`` in place."""
        p = self.params
        norm, lower, upper = self.threat.norm, self.threat.lower, self.threat.upper
        stop_at = None if self.minimum_norm else self.threat.eps
        x0, y0 = x[idx], y[idx]
        for step in range(p["steps"] + 1):
            need_grad = step < p["steps"]
            x_leaf, out = forward_for_gradients(model, x_cur, need_grad)
            st.forwards[idx] += 1
            adv = out.detach().argmax(dim=1) != y0
            if bool(adv.any()):
                dist = norms(x_cur - x0, norm)
                better = adv & (dist < st.best_norm[idx])
                hit = idx[better]
                st.best[hit] = x_cur[better]
                st.best_norm[hit] = dist[better]
                if stop_at is not None:
                    keep = st.best_norm[idx] > stop_at
                    if not bool(keep.all()):
                        idx, x0, y0, classes = idx[keep], x0[keep], y0[keep], classes[keep]
                        x_cur, adv = x_cur[keep], adv[keep]
                        if idx.numel() == 0:
                            return
                # The backward step: continue from closer to the clean point.
                x_cur = torch.where(adv.view(-1, *[1] * (x0.dim() - 1)), x0 + p["beta"] * (x_cur - x0), x_cur)
                if need_grad:
                    # Linearize at the moved points (and only for the samples still running).
                    x_leaf, out = forward_for_gradients(model, x_cur, True)
                    st.forwards[idx] += 1
            if not need_grad:
                break
            with torch.enable_grad():
                df, dg = margin_gradients(x_leaf, out, y0, classes)
            st.grads[idx] += classes.shape[1]
            x_cur = self._step(x_cur, x0, df, dg.flatten(2), norm, lower, upper)
        st.last[idx] = x_cur

    def _step(self, x_cur, x0, df, dg, norm, lower, upper) -> torch.Tensor:
        p = self.params
        n = x_cur.shape[0]
        rows = torch.arange(n, device=x_cur.device)
        choice = (df.abs() / (_dual_norms(dg, norm) + 1e-12)).argmin(dim=1)
        f, w = df[rows, choice], dg[rows, choice]
        xf, x0f = x_cur.flatten(1), x0.flatten(1)
        # Hyperplane f + <w, z - x_cur> = 0, reached from x_cur and from x0 inside the box.
        r_cur = -f
        r_orig = -f - (w * (x0f - xf)).sum(dim=1)
        d = min_norm_to_hyperplane(
            torch.cat([w, w]), torch.cat([r_cur, r_orig]),
            torch.cat([lower - xf, lower - x0f]), torch.cat([upper - xf, upper - x0f]), norm,
        )
        d_cur, d_orig = d[:n], d[n:]
        n_cur, n_orig = norms(d_cur, norm), norms(d_orig, norm)
        total = n_cur + n_orig
        alpha = torch.where(total > 0, n_cur / total.clamp_min(1e-30), torch.zeros_like(total))
        alpha = alpha.clamp(0.0, p["alpha_max"]).unsqueeze(1)
        eta = p["eta"]
        new = (1 - alpha) * (xf + eta * d_cur) + alpha * (x0f + eta * d_orig)
        return new.clamp(lower, upper).view_as(x_cur)


@register_attack
class FABTargeted(FAB):
    """FAB-T at a fixed budget: targeted FAB against each of the ``n_target_classes`` most likely other
    classes in turn, each on the samples still robust (labels are the true classes)."""

    name = "fab-t"
    defaults = {**FAB.defaults, "n_target_classes": 9}
    multi_targeted = True


@register_attack
class FABMinimumNorm(FAB):
    """FAB as a minimum-norm attack: the smallest misclassifying perturbation found in all runs,
    then ``line_search`` bisection steps towards the clean point."""

    name = "fab-min"
    defaults = {**FAB.defaults, "line_search": 10}
    minimum_norm = True


@register_attack
class FABTargetedMinimumNorm(FABTargeted):
    """FAB-T as a minimum-norm attack: the smallest perturbation found over all target classes."""

    name = "fab-t-min"
    defaults = {**FABTargeted.defaults, "line_search": 10}
    minimum_norm = True
