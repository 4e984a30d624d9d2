"""JSMA, the Jacobian-based saliency map attack (Papernot et al. 2016, "The limitations of deep
learning in adversarial settings"), in the L0 threat model (at most ``eps`` pixels changed).

Each iteration computes two input gradients at the current image: of the target class's logit
(``a``) and of the sum of the other logits (``b``). Over all pairs ``(p, q)`` of distinct features
still in the search domain it picks the one with ``a_p + a_q > 0``, ``b_p + b_q < 0`` and the largest
``(a_p + a_q) |b_p + b_q|`` (the paper's pairwise saliency map, increasing features), raises both by
``theta`` (clipped to the box) and removes them from the domain. A run stops when it reaches the
target (targeted) or the image is misclassified (untargeted: any misclassification counts), when no
pair qualifies, or when ``eps`` pixels have changed. Grayscale and colour images alike: each
(channel, pixel) is a feature; a pixel counts once in L0 whatever its channels, and a pair is only
taken while the changed pixels stay within ``eps``.

Targets (untargeted): an increasing-features attack succeeds or fails by its target class, and the
clean image's most likely other class is often a poor one (on an adversarially trained MNIST model
it broke 5 of 20 points where the class (y + 1) mod 10 broke 15). So each point is attacked towards
its ``n_target_classes`` most likely other classes (by clean logit; default: every other class) at
once, as one batch of (point, target) runs advancing in lockstep; a point stops at the first
iteration where any of its runs misclassifies it, keeping the run with the fewest changed pixels
(ties: the more likely target). A run aimed at one class is the same run as a single-target attack
on that class, so no target choice of a peer (torchattacks' (y + 1) mod 10, ART's random class) can
break a point this one does not. Targeted: the given class only.

The pair search is exact without the (features x features) matrix for most of the work: the score
grows with both ``a`` and ``-b`` wherever a pair qualifies, so a feature that two others beat in both
(a Pareto domination, ties ordered by value and index) is never needed: replace it by one of them that
is not its partner and the score does not drop. Only the features dominated at most once are paired
(a few dozen typically), in bounded memory chunks; ties in the score go to the smallest
``p * features + q`` as in the full matrix.

Costs per iteration and active (point, target) run: one forward pass and two input gradients (on the
same pass), counted on the point.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import top_other_classes
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.threat import L0, norms

PAIR_CHUNK = 1 << 24  # score-matrix elements held at once in the pair search


def pareto_candidates(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(R, d) bool: the features of each row dominated by at most one other, where ``j`` dominates
    ``i`` if ``u_j >= u_i`` and ``v_j >= v_i`` and ``(u_j, v_j, -j) > (u_i, v_i, -i)`` (a strict order,
    so ties cannot drop a whole group). Features with ``v = -inf`` are never candidates."""
    by_v = torch.sort(v, dim=1, descending=True, stable=True).indices
    order = by_v.gather(1, torch.sort(u.gather(1, by_v), dim=1, descending=True, stable=True).indices)
    vs = v.gather(1, order)  # in the order (u desc, v desc, index asc): predecessors are the dominators
    pad = torch.full_like(vs[:, :1], float("-inf"))
    first = torch.cat([pad, vs.cummax(dim=1).values[:, :-1]], dim=1)  # the best v before i
    # the second best v before i: max over k < i of min(best before k, v_k)
    second = torch.cat([pad, torch.minimum(first, vs).cummax(dim=1).values[:, :-1]], dim=1)
    keep = (second < vs) & (vs > float("-inf"))
    return torch.zeros_like(keep).scatter(1, order, keep)


def best_pairs(a: torch.Tensor, b: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of (R, d) gradients ``a`` (target) and ``b`` (the other classes) and the (R, d) bool
    search ``domain``: the pair ``p != q`` of domain features with ``a_p + a_q > 0``, ``b_p + b_q < 0``
    maximising ``(a_p + a_q) * -(b_p + b_q)``, ties to the smallest ``p * d + q``. Returns (p, q, found)."""
    r, d = a.shape
    u = torch.where(domain, a, torch.full_like(a, float("-inf")))
    v = torch.where(domain, -b, torch.full_like(b, float("-inf")))
    keep = pareto_candidates(u, v)
    k = max(2, int(keep.sum(dim=1).max()) if r else 2)
    k = min(k, d)
    cand = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]  # (R, k)
    ok_c = keep.gather(1, cand)
    ua, vb = a.gather(1, cand), -b.gather(1, cand)
    p_out = torch.zeros(r, dtype=torch.long, device=a.device)
    q_out = torch.zeros_like(p_out)
    found = torch.zeros(r, dtype=torch.bool, device=a.device)
    eye = torch.eye(k, dtype=torch.bool, device=a.device)
    step = max(1, PAIR_CHUNK // (k * k))
    for s in range(0, r, step):
        sl = slice(s, s + step)
        alpha = ua[sl].unsqueeze(2) + ua[sl].unsqueeze(1)
        beta = vb[sl].unsqueeze(2) + vb[sl].unsqueeze(1)  # -(b_p + b_q), bit for bit
        valid = ok_c[sl].unsqueeze(2) & ok_c[sl].unsqueeze(1) & ~eye & (alpha > 0) & (beta > 0)
        score = torch.where(valid, alpha * beta, torch.full_like(alpha, -1.0)).flatten(1)
        best = score.max(dim=1, keepdim=True).values
        ci = cand[sl]
        flat = (ci.unsqueeze(2) * d + ci.unsqueeze(1)).flatten(1)  # the pair's index in the full matrix
        pick = torch.where(score == best, flat, torch.full_like(flat, d * d)).min(dim=1).values
        found[sl] = best.squeeze(1) > 0
        p_out[sl], q_out[sl] = pick // d, pick % d
    return p_out, q_out, found


@register_attack
class JSMA(Attack):
    """JSMA (L0; targeted or untargeted). theta: the change of a chosen feature (1.0: to the top of
    the box). n_target_classes (untargeted): the most likely other classes each point is attacked
    towards at once (first success per point, the sparsest of that iteration; default 9: every
    other class of a 10-class model)."""

    name = "jsma"
    norms = (L0,)
    defaults = {"theta": 1.0, "n_target_classes": 9}

    def validate(self) -> None:
        super().validate()
        if not 0 < self.params["theta"] <= 1:
            raise RobustlabError(f"attack {self.name!r}: theta must be in (0, 1], got {self.params['theta']}")
        if self.params["n_target_classes"] < 1:
            got = self.params["n_target_classes"]
            raise RobustlabError(f"attack {self.name!r}: n_target_classes must be >= 1, got {got}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        threat, theta = self.threat, self.params["theta"]
        n, dev = x.shape[0], x.device
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        if self.targeted:
            targets = y.unsqueeze(1)
        else:
            logits = self.logits(model, x)
            forwards += 1
            targets = top_other_classes(logits, y, min(self.params["n_target_classes"], logits.shape[1] - 1))
        k = targets.shape[1]
        owner = torch.arange(n, device=dev).repeat_interleave(k)  # run -> point
        target = targets.reshape(-1)
        x0 = x[owner]
        cur = x0.clone()
        domain = (x0 < threat.upper).flatten(1)
        active = torch.ones(len(owner), dtype=torch.bool, device=dev)
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        chosen = torch.arange(n, device=dev) * k  # the run whose image a point returns (first target if none wins)
        budget = int(threat.eps)
        while True:
            idx = active.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                break
            x_req = cur[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = check_logits(model(x_req), idx.numel())
                t = target[idx]
                z_t = logits.gather(1, t.unsqueeze(1)).sum()
                (a,) = torch.autograd.grad(z_t, x_req, retain_graph=True)
                (b,) = torch.autograd.grad(logits.sum() - z_t, x_req)
            pts = owner[idx]
            forwards.index_add_(0, pts, torch.ones_like(pts))
            grads.index_add_(0, pts, torch.full_like(pts, 2))
            logits = logits.detach()
            done = logits.argmax(1) == t if self.targeted else self.is_success(logits, y[pts])
            changed = norms(cur[idx] - x0[idx], L0)
            if bool(done.any()):
                # A point's first successful iteration: keep its sparsest run (then the likelier target).
                key = changed.to(torch.float64) * (k + 1) + (idx % k)
                key = torch.where(done, key, torch.full_like(key, float("inf")))
                best = torch.full((n,), float("inf"), dtype=torch.float64, device=dev).scatter_reduce(
                    0, pts, key, reduce="amin")
                won = done & (key == best[pts])
                chosen[pts[won]] = idx[won]
                success[pts[won]] = True
                stop_pt = torch.zeros(n, dtype=torch.bool, device=dev)
                stop_pt[pts[won]] = True
                active &= ~stop_pt[owner]
            go = active[idx] & (changed + 2 <= budget)
            active[idx[~go]] = False
            rows = idx[go]
            if rows.numel() == 0:
                continue
            p, q, ok = best_pairs(a[go].flatten(1), b[go].flatten(1), domain[rows])
            active[rows[~ok]] = False
            rows, p, q = rows[ok], p[ok], q[ok]
            view = cur.view(len(owner), -1)
            for f in (p, q):
                view[rows, f] = (view[rows, f] + theta).clamp(threat.lower, threat.upper)
                domain[rows, f] = False
        return AttackResult(cur[chosen], success, grads, forwards)
