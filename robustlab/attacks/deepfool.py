"""DeepFool (Moosavi-Dezfooli et al. 2016), L2 and Linf: a minimum-norm attack.

At each step the classifier is linearized around the current point, and the point moves onto the
closest linearized decision boundary among the ``candidates`` most likely classes (in the threat
model's norm: the distance to the boundary of class ``l`` is ``|f_l| / ||w_l||_q`` with
``f_l = z_l - z_y``, ``w_l`` its input gradient and ``q`` the dual norm). The accumulated step is
scaled by ``1 + overshoot`` and clipped to the box. A sample stops as soon as it is misclassified.

Also the home of helpers the other minimum-norm attacks share: the gradients of several logit
differences ``z_c - z_y`` at once (one vector-Jacobian product per class, on one forward pass), and
the final bisection of FAB-min, CW and EAD towards the decision boundary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.threat import norms


def forward_for_gradients(
    model: nn.Module, x: torch.Tensor, with_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_leaf, logits)``: a forward pass on a fresh leaf copy of ``x``; with ``with_graph`` the
    logits keep the graph back to ``x_leaf`` (and nothing else: the model's parameters are not
    differentiated), so input gradients can follow."""
    x_leaf = x.detach().requires_grad_(with_graph)
    with torch.set_grad_enabled(with_graph):
        out = check_logits(model(x_leaf), x.shape[0])
    return x_leaf, out


def margin_gradients(
    x_leaf: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, others: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and input gradients of ``z_c - z_y`` for the classes ``c`` in each row of ``others``.

    x_leaf, logits: from :func:`forward_for_gradients` (with the graph); y: (N,) the reference class;
    others: (N, m) classes. Returns ``df`` (N, m) and ``dg`` (N, m, *x.shape[1:]); costs one forward
    (already spent) and exactly ``m`` vector-Jacobian products, each one input gradient per sample.
    """
    m = others.shape[1]
    rows = torch.arange(logits.shape[0], device=logits.device)
    df = (logits.gather(1, others) - logits[rows, y].unsqueeze(1)).detach()
    grads = []
    for k in range(m):
        seed = torch.zeros_like(logits)
        seed[rows, others[:, k]] = 1.0
        seed[rows, y] -= 1.0
        (g,) = torch.autograd.grad(logits, x_leaf, seed, retain_graph=k < m - 1)
        grads.append(g)
    return df, torch.stack(grads, dim=1)


def top_other_classes(logits: torch.Tensor, y: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count): the ``count`` classes other than ``y`` with the largest logits, best first."""
    masked = logits.detach().scatter(1, y.unsqueeze(1), float("-inf"))
    return masked.topk(count, dim=1).indices


def bisect_to_boundary(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    best: torch.Tensor,
    best_dist: torch.Tensor,
    norm: str,
    steps: int,
    is_adv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forwards: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> None:
    """Move each best adversarial closer to the clean point along the segment between them.

    For every sample with ``0 < best_dist < inf`` (and not ``skip``), ``steps`` bisection steps on
    ``t`` in [0, 1] over
    ``x + t (best - x)`` (misclassified at ``t = 1``), keeping each checked misclassified point that
    is closer; updates ``best`` and ``best_dist`` in place and adds one forward pass per step to
    ``forwards``. No gradients. ``is_adv(logits, y)`` is the attack's success test.
    """
    todo = torch.isfinite(best_dist) & (best_dist > 0)
    if skip is not None:
        todo &= ~skip
    idx = todo.nonzero(as_tuple=True)[0]
    if idx.numel() == 0 or steps <= 0:
        return
    x0, y0, direction = x[idx], y[idx], best[idx] - x[idx]
    lo = torch.zeros(idx.numel(), dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = x0 + _bcast(mid, x0) * direction
        with torch.no_grad():
            adv = is_adv(check_logits(model(cand), cand.shape[0]), y0)
        forwards[idx] += 1
        dist = norms(cand - x0, norm)
        better = adv & (dist < best_dist[idx])
        best[idx[better]] = cand[better]
        best_dist[idx[better]] = dist[better]
        hi, lo = torch.where(adv, mid, hi), torch.where(adv, lo, mid)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


@register_attack
class DeepFool(Attack):
    """DeepFool in L2 or Linf (minimum-norm; untargeted).

    steps: maximum iterations; overshoot: the accumulated perturbation is scaled by
    ``1 + overshoot``; candidates: the true class and the ``candidates - 1`` other classes with
    the largest clean logits are considered (10: all classes of a 10-class model).

    Returns the first misclassified iterate of each sample (its distance is what DeepFool found);
    samples never misclassified come back unchanged with ``success=False``. Costs per step and
    sample: one forward pass and ``candidates - 1`` input gradients (one more forward pass on the
    steps where other samples of the batch finish, so that no gradient is spent on finished ones),
    plus one forward pass on the last iterate.
    """

    name = "deepfool"
    defaults = {"steps": 50, "overshoot": 0.02, "candidates": 10}
    norms = ("l2", "linf")
    minimum_norm = True

    def validate(self) -> None:
        super().validate()
        if self.targeted:
            raise RobustlabError(f"attack {self.name!r} is untargeted only (labels are the true classes)")
        if self.params["overshoot"] < 0:
            raise RobustlabError(f"attack {self.name!r}: overshoot must be >= 0, got {self.params['overshoot']}")
        if self.params["candidates"] < 2:
            raise RobustlabError(f"attack {self.name!r}: candidates must be >= 2, got {self.params['candidates']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n = x.shape[0]
        dev = x.device
        lo, hi = self.threat.lower, self.threat.upper
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        best = x.clone()
        idx = torch.arange(n, device=dev)
        x_cur, r_tot = x.clone(), torch.zeros_like(x)
        others = None
        for step in range(p["steps"] + 1):
            need_grad = step < p["steps"]
            x_leaf, out = forward_for_gradients(model, x_cur, need_grad)
            forwards[idx] += 1
            if others is None:
                others = top_other_classes(out, y, min(p["candidates"], out.shape[1]) - 1)
            done = out.detach().argmax(dim=1) != y[idx]
            if bool(done.any()):
                best[idx[done]] = x_cur[done]
                success[idx[done]] = True
                keep = ~done
                idx, x_cur, r_tot, others = idx[keep], x_cur[keep], r_tot[keep], others[keep]
                if idx.numel() == 0 or not need_grad:
                    break
                # Re-run the forward pass on the survivors so no gradient is spent on finished samples.
                x_leaf, out = forward_for_gradients(model, x_cur, True)
                forwards[idx] += 1
            if not need_grad:
                break
            with torch.enable_grad():
                df, dg = margin_gradients(x_leaf, out, y[idx], others)
            grads[idx] += others.shape[1]
            flat = dg.flatten(2)
            dual = flat.norm(p=2, dim=2) if self.threat.norm == "l2" else flat.abs().sum(dim=2)
            choice = (df.abs() / (dual + 1e-12)).argmin(dim=1)
            rows = torch.arange(idx.numel(), device=dev)
            f, w, wn = df[rows, choice], dg[rows, choice], dual[rows, choice]
            # The distance to the linearized boundary, plus the published implementation's 1e-4.
            size = f.abs() / (wn + 1e-12) + 1e-4
            if self.threat.norm == "l2":
                move = _bcast(size / (wn + 1e-12), w) * w
            else:
                move = _bcast(size, w) * w.sign()
            r_tot = r_tot + move
            x_cur = (x[idx] + (1.0 + p["overshoot"]) * r_tot).clamp(lo, hi)
        return AttackResult(best, success, grads, forwards)

