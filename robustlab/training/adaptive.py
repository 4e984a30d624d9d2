"""Adversarial training with an adaptive inner maximization: per-sample radii (MMA) and per-sample
stopping by a convergence criterion (dynamic AT with FOSC).

``mma`` -- Max-Margin Adversarial training (Ding, Sharma, Lui & Huang, "MMA Training: Direct Input
Space Margin Maximization through Adversarial Training", ICLR 2020). For each correctly classified
point, an approximately shortest successful perturbation is searched (:func:`adaptive_norm_pgd`),
and the model is trained with cross-entropy at that point on the decision boundary, which enlarges
the point's input-space margin; misclassified points get clean cross-entropy. Loss (the paper's
"MMA" combined with a clean term, their default)::

    clean_weight * CE(f(x), y)  +  (1 - clean_weight) * (1/N) * [ sum_{correct, margin < eps_max} CE(f(x + delta*), y)
                                                                 + sum_{misclassified} CE(f(x), y) ]

with ``clean_weight = 1/3`` (``clean_weight=0`` is the paper's "OMMA"). Points whose margin reaches
``eps_max`` (the paper's d_max) contribute no adversarial term: the hinge ``max(0, d_max - d)`` of
the paper is zero for them.

What is implemented, against the paper and its reference code:

- Shortest perturbation (the paper's AN-PGD): PGD maximizing the soft logit margin
  ``logsumexp_{j != y} z_j - z_y`` (the authors' attack loss) in a ball of radius ``start_eps``,
  ``steps`` steps of ``alpha`` (default ``2.5 * start_eps / steps``, the paper's step scale), uniform
  random start; then a search on the radius along the ray from ``x`` through the PGD point: the ray
  is checked at the PGD radius and at ``eps_max`` and bisected ``search_steps`` times (paper: 10)
  inside the bracket that holds the boundary (points beyond the box are clipped to it).
- Assumption (the main difference): the paper starts each sample's PGD at the margin that sample
  had in the previous epoch (kept in a table indexed by the sample's position in the data set,
  floored at a minimum radius). Objectives here see batches, not data-set indices, and a resumed
  run must draw exactly what an uninterrupted one does, so the search is stateless: every sample
  starts at ``start_eps`` (default: the threat model's epsilon). The line search still adapts the
  radius per sample in [0, eps_max].
- ``eps_max`` default: 1.5 times the threat model's epsilon. The paper trains Linf models with
  d_max = 0.45 on MNIST (1.5 x the test eps 0.3) and 12/255 on CIFAR-10 (1.5 x 8/255; 20/255 and
  32/255 are reported too); for L2 it uses 1, 2 or 3 x the test eps (2.0 MNIST, 1.0 CIFAR-10), so
  pass ``eps_max`` explicitly for L2. The reference code searches up to 1.05 d_max and applies the
  hinge at d_max; here both are ``eps_max``.
- Correctness, and success along the ray, are judged by the predicted class (argmax) with the
  model in eval mode; the reference code uses the sign of the soft logit margin, which is slightly
  stricter. The returned point of a broken sample is the nearest point on the ray found to be
  misclassified (so it is misclassified, by construction), not the last bisection midpoint.
- Published: MNIST (LeNet) Adam lr 1e-4, batch 50, 40 PGD steps; CIFAR-10 (WRN-28-4) SGD, 10
  steps. Only the objective is here; optimizers and schedules are the loop's.

``dynamic-at`` -- dynamic adversarial training (Wang, Ma, Bailey, Yi, Zhou & Gu, "On the
Convergence and Robustness of Adversarial Training", ICML 2019). The convergence of the inner
maximization at ``x'`` is measured by the First-Order Stationary Condition (:func:`fosc`)::

    FOSC(x') = max_{x'' in X} <x'' - x', g>  =  eps * ||g||_1 - <x' - x, g>   (Linf ball, box ignored)

with ``g`` the gradient of the cross-entropy at ``x'``. PGD stops for a sample once its FOSC is
<= c_t, with ``c_t = c_max * max(0, 1 - progress / dynamic_fraction)``: weak (early-stopped)
adversarial examples early in training, fully converged ones later. Published: ``c_max = 0.5``,
c_t falling linearly to 0 over the first 80% of training (T' = 0.8 T; the authors' CIFAR-10 code
uses 100 of 120 epochs, updated per epoch; here per step, from the loop's ``progress``), Linf eps
0.031 on CIFAR-10 with 10 steps of eps/4 from a uniform random start (the defaults here: 10 steps
of ``2.5 * eps / steps``, the same). As in the authors' code the first step is always taken and the FOSC is checked after
each step. Not implemented: the authors' code also reweights each adversarial example's loss by
its own cross-entropy after the first epoch; the paper does not describe it.

FOSC over the valid box: by default :func:`fosc` maximizes over the real feasible set (the Linf
ball intersected with the [0, 1] box), ``sum_i max(g_i (hi_i - x'_i), g_i (lo_i - x'_i))``, which
equals the paper's closed form wherever the box is inactive and, unlike it, is 0 at a stationary
point that sits on the box (e.g. the black background of digits). ``box=None`` gives the paper's
formula as written. For L2 and L1 balls the dual-norm closed form is used (box ignored; an upper
bound on the FOSC over ball-and-box).

Both recipes run their inner maximization in eval mode and differentiate with respect to the input
only (through :mod:`robustlab.training.inner`); projections and steps are the threat model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel, norms
from robustlab.training import inner
from robustlab.training.objectives import Objective, _accuracy, register_objective

__all__ = ["DynamicAT", "MMA", "MarginSearch", "adaptive_norm_pgd", "dynamic_pgd", "fosc", "soft_logit_margin"]


# ---------------------------------------------------------------------- FOSC


def _fosc_from_gradient(
    grad: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str,
    box: tuple[float, float] | None,
) -> torch.Tensor:
    """Per-sample FOSC (N,) from the loss gradient ``grad`` at ``x_adv`` (see :func:`fosc`)."""
    g = grad.float()
    if norm == "linf" and box is not None:
        lo = (x.float() - eps).clamp(min=box[0])
        hi = (x.float() + eps).clamp(max=box[1])
        xa = x_adv.float()
        # The best feasible move along each coordinate: to the face the gradient points at.
        gain = torch.where(g > 0, g * (hi - xa), g * (lo - xa)).clamp_min(0.0)
        return gain.flatten(1).sum(dim=1)
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}[norm]
    inner_product = ((x_adv.float() - x.float()) * g).flatten(1).sum(dim=1)
    return (eps * norms(g, dual) - inner_product).clamp_min(0.0)


def fosc(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    eps: float | ThreatModel,
    norm: str = "linf",
    box: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """First-Order Stationary Condition of the cross-entropy maximization at ``x_adv`` (Wang et al.,
    ICML 2019): ``max_{x'' feasible} <x'' - x_adv, g>``, with ``g`` the gradient of the per-sample
    cross-entropy of ``y`` at ``x_adv`` and the feasible set the ``norm`` ball of radius ``eps``
    around ``x``. Returns a float tensor (N,), >= 0 for a feasible ``x_adv``, and 0 exactly at a
    first-order stationary point: the smaller, the better the attack converged.

    Linf: ``eps * ||g||_1 - <x_adv - x, g>`` when ``box`` is None (the paper's formula); with a
    ``box`` (default [0, 1]) the ball intersected with the box, which is what an attack can reach.
    L2 / L1: the dual-norm formula, box ignored. ``eps`` may be a :class:`ThreatModel` (its norm,
    radius and box are used). Model in eval mode for the gradient (modes restored); input gradient
    only. Works for the result of any attack.
    """
    if isinstance(eps, ThreatModel):
        threat = eps
        eps, norm, box = threat.eps, threat.norm, (threat.lower, threat.upper)
    norm = str(norm).lower()
    if norm not in ("linf", "l2", "l1"):
        raise RobustlabError(f"unknown norm {norm!r}; use linf, l2 or l1")
    if x.shape != x_adv.shape:
        raise RobustlabError(f"x and x_adv differ in shape: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    with eval_mode(model):
        _, grad = inner.input_gradient(model, inner.same_layout(x_adv.detach(), x), inner.cross_entropy_loss(y))
    return _fosc_from_gradient(grad, x.detach(), x_adv.detach(), float(eps), norm, box).detach()


def _layout_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (possibly a subset of rows of a batch like ``like``) in ``like``'s memory format."""
    if t.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def dynamic_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    alpha: float,
    criterion: float,
    start: str = "uniform",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD on the cross-entropy that stops per sample once its FOSC is <= ``criterion`` (the inner
    maximization of dynamic AT). The first step is always taken; after each step the FOSC is
    measured, and only samples above the criterion go on (the others are not recomputed), for at most
    ``steps`` steps of size ``alpha``. Returns ``(x_adv, fosc, steps_taken)``: the batch (inside
    ``threat``, detached), the FOSC of each sample at its final point (N,) and the number of steps
    each sample took (N,, int). Eval mode, input gradients only."""
    x = x.detach()
    n = x.shape[0]
    loss_all = inner.cross_entropy_loss(y)
    value = torch.zeros(n, device=x.device)
    taken = torch.zeros(n, dtype=torch.long, device=x.device)
    sel = torch.arange(n, device=x.device)
    with eval_mode(model):
        x_adv = inner.same_layout(inner.start_point(x, threat, start, generator), x).detach()
        for k in range(steps + 1):
            full = sel.numel() == n
            xa = x_adv if full else _layout_like(x_adv[sel], x)
            x0 = x if full else x[sel]
            _, grad = inner.input_gradient(model, xa, loss_all if full else inner.cross_entropy_loss(y[sel]))
            v = _fosc_from_gradient(grad, x0, xa, threat.eps, threat.norm, (threat.lower, threat.upper))
            value[sel] = v
            if k == steps:
                break
            if k > 0:  # stop the samples that reached the criterion
                keep = v > criterion
                if not bool(keep.all()):
                    sel, xa, x0, grad = sel[keep], xa[keep], x0[keep], grad[keep]
                    if sel.numel() == 0:
                        break
            moved = threat.project(xa + threat.steepest_step(grad, alpha, xa), x0)
            if sel.numel() == n:
                x_adv = inner.same_layout(moved, x)
            else:
                x_adv = x_adv.clone()
                x_adv[sel] = moved.to(x_adv.dtype)
            taken[sel] += 1
    return x_adv.detach(), value, taken


# ---------------------------------------------------------------------- shortest perturbation (MMA)


def soft_logit_margin(y: torch.Tensor) -> inner.LogitLoss:
    """Per-sample soft logit margin ``logsumexp_{j != y} z_j - z_y`` (positive once misclassified,
    smooth): the loss MMA's attack maximizes."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        true = z.gather(1, y[:, None]).squeeze(1)
        others = z.scatter(1, y[:, None], float("-inf"))
        return torch.logsumexp(others, dim=1) - true

    return loss


@dataclass
class MarginSearch:
    """Result of :func:`adaptive_norm_pgd` for a batch of N points.

    x_adv: (N, ...) the nearest misclassified point found for broken points; the point at ``eps_max``
    on the searched ray for correct points not broken within ``eps_max``; the clean point for
    misclassified ones. margin: (N,) the distance of ``x_adv`` for broken points, ``eps_max`` for
    unbroken ones (their margin is at least that, as far as the search knows), 0 for misclassified
    ones. broken: (N,) correct points misclassified at ``x_adv``. correct: (N,) clean points
    classified correctly (eval mode).
    """

    x_adv: torch.Tensor
    margin: torch.Tensor
    broken: torch.Tensor
    correct: torch.Tensor


def adaptive_norm_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    eps_max: float,
    start_eps: float | None = None,
    steps: int = 10,
    alpha: float | None = None,
    search_steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> MarginSearch:
    """Approximately shortest successful perturbation of each correctly classified point, up to
    ``eps_max`` (in ``threat``'s norm; ``threat`` gives the norm and the box, its eps is only the
    default start radius): PGD on the soft logit margin in the ball of radius ``start_eps`` (default
    ``min(threat.eps, eps_max)``), ``steps`` steps of ``alpha`` (default ``2.5 * start_eps / steps``),
    then a bisection of ``search_steps`` steps on the radius along the ray from ``x`` through the PGD
    point, within [0, eps_max] (the AN-PGD search of Ding et al. 2020, without their per-sample
    memory of the previous epoch's margin). Eval mode, input gradients only; see
    :class:`MarginSearch` for what is returned."""
    if not eps_max > 0:
        raise RobustlabError(f"eps_max must be > 0, got {eps_max}")
    x = x.detach()
    n = x.shape[0]
    r0 = min(float(threat.eps if start_eps is None else start_eps), float(eps_max))
    if not r0 > 0:
        raise RobustlabError(f"the start radius must be > 0, got {r0}")
    step = float(alpha) if alpha is not None else 2.5 * r0 / steps
    out = x.clone()
    margin = torch.zeros(n, device=x.device)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    with eval_mode(model):
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        rows = correct.nonzero(as_tuple=True)[0]
        if rows.numel():
            xc, yc = x[rows], y[rows]
            x_pgd = inner.maximize(model, xc, soft_logit_margin(yc), threat.with_eps(r0), steps, step,
                                   "uniform" if random_start else "none", generator)
            unit = (x_pgd - xc) / r0  # the ray; the PGD point is at t = r0
            reach = threat.with_eps(float(eps_max))
            shape = (-1, *[1] * (x.dim() - 1))

            def on_ray(t: torch.Tensor) -> torch.Tensor:
                return reach.project(xc + t.view(shape).to(xc.dtype) * unit, xc)

            with torch.no_grad():
                def fooled(z: torch.Tensor) -> torch.Tensor:
                    return model(inner.same_layout(z, xc)).argmax(dim=1) != yc

                m = rows.numel()
                top = torch.full((m,), float(eps_max), device=x.device)
                at_r0 = fooled(x_pgd)
                far = on_ray(top)
                at_max = fooled(far) & ~at_r0
                found = at_r0 | at_max
                best = torch.where(at_r0.view(shape), x_pgd, far)
                # Bracket [lo, hi] with the boundary inside and hi known to be misclassified.
                lo = torch.where(at_r0, torch.zeros_like(top), torch.full_like(top, r0))
                hi = torch.where(at_r0, torch.full_like(top, r0), top)
                for _ in range(search_steps):
                    live = found & (hi - lo > 0)
                    if not bool(live.any()):
                        break
                    mid = (lo + hi) / 2
                    cand = on_ray(mid)
                    hit = fooled(cand) & live
                    hi = torch.where(hit, mid, hi)
                    lo = torch.where(live & ~hit, mid, lo)
                    best = torch.where(hit.view(shape), cand, best)
                dist = reach.distance(best, xc).float()
                margin[rows] = torch.where(found, dist, top)
                broken[rows] = found
                out[rows] = best.to(out.dtype)
    return MarginSearch(inner.same_layout(out, x).detach(), margin, broken, correct)


# ---------------------------------------------------------------------- recipes


def _positive_or_none(owner: str, key: str, value) -> None:
    if value is not None and not (isinstance(value, float) and value > 0):
        raise RobustlabError(f"recipe {owner!r}: {key} must be a number > 0 (or none), got {value!r}")


@register_objective
class MMA(Objective):
    """Max-Margin Adversarial training (Ding, Sharma, Lui & Huang, "MMA Training: Direct Input
    Space Margin Maximization through Adversarial Training", ICLR 2020): cross-entropy at the
    approximately shortest successful perturbation of each correctly classified point (found by
    :func:`adaptive_norm_pgd`, capped at ``eps_max``), clean cross-entropy on misclassified points,
    no adversarial term for points whose margin reaches ``eps_max``; combined with the clean loss as
    ``clean_weight * CE_clean + (1 - clean_weight) * MMA`` (published 1/3; 0 is "OMMA").

    ``eps_max`` (the paper's d_max): default 1.5 x the threat model's eps (the paper's Linf
    settings: 0.45 for MNIST eps 0.3, 12/255 for CIFAR-10 eps 8/255; set it for L2, where the paper
    uses 1-3 x eps). ``start_eps``: PGD radius before the line search (default the threat's eps;
    the paper uses each sample's margin from the previous epoch, a state this stateless recipe
    does not keep). ``steps`` (published 10 CIFAR-10, 40 MNIST), ``alpha`` (default 2.5 *
    start_eps / steps), ``search_steps`` (10). The epsilon warm-up scales ``eps_max`` and
    ``start_eps``. Logs ``margin``: the batch's mean margin (0 for misclassified points, eps_max
    for unbroken ones). Details and assumptions: :mod:`robustlab.training.adaptive`.
    """

    name = "mma"
    defaults = {"eps_max": None, "start_eps": None, "clean_weight": 1.0 / 3.0, "steps": 10, "alpha": None,
                "search_steps": 10, "random_start": True, "eps_warmup": 0.0}

    def validate(self) -> None:
        p = self.params
        for key in ("eps_max", "start_eps", "alpha"):
            _positive_or_none(self.name, key, p[key])
        super().validate()
        if not 0.0 <= p["clean_weight"] <= 1.0:
            raise RobustlabError(f"recipe {self.name!r}: clean_weight must be in [0, 1], got {p['clean_weight']}")
        if p["search_steps"] < 1:
            raise RobustlabError(f"recipe {self.name!r}: search_steps must be >= 1, got {p['search_steps']}")
        if p["eps_max"] is None and not self.threat.eps > 0:
            raise RobustlabError(f"recipe {self.name!r}: needs eps > 0 in the threat model, or eps_max")

    def radii(self) -> tuple[float, float]:
        """(start radius, eps_max) at the current point of the run (warm-up applied)."""
        p, eps, ramp = self.params, self.threat.eps, self.ramp()
        eps_max = (1.5 * eps if p["eps_max"] is None else p["eps_max"]) * ramp
        start = (eps if p["start_eps"] is None else p["start_eps"]) * ramp
        return min(start, eps_max), eps_max

    def search(self, model, x, y, generator=None) -> MarginSearch:
        p = self.params
        start, eps_max = self.radii()
        alpha = None if p["alpha"] is None else p["alpha"] * self.ramp()
        return adaptive_norm_pgd(model, x, y, self.threat, eps_max, start, p["steps"], alpha, p["search_steps"],
                                 p["random_start"], generator)

    def perturb(self, model, x, y, generator=None):
        return self.search(model, x, y, generator).x_adv

    def loss(self, model, x, y, generator):
        found = self.search(model, x, y, generator)
        weight = self.params["clean_weight"]
        logits_mma = model(found.x_adv)
        per_sample = F.cross_entropy(logits_mma.float(), y, reduction="none")
        used = (found.broken | ~found.correct).float()
        mma = (per_sample * used).sum() / x.shape[0]
        logs = {"adv_acc": _accuracy(logits_mma, y), "margin": found.margin.mean().detach(), "mma": mma.detach(),
                "broken": found.broken.float().mean()}
        if weight > 0:
            logits = model(x)
            ce = F.cross_entropy(logits.float(), y)
            logs.update(clean_acc=_accuracy(logits, y), ce=ce.detach())
            return weight * ce + (1.0 - weight) * mma, logs
        logs["clean_acc"] = found.correct.float().mean()
        return mma, logs


@register_objective
class DynamicAT(Objective):
    """Dynamic adversarial training (Wang, Ma, Bailey, Yi, Zhou & Gu, "On the Convergence and
    Robustness of Adversarial Training", ICML 2019): cross-entropy on PGD examples whose PGD stops,
    per sample, once the First-Order Stationary Condition (:func:`fosc`) is <= c_t, with c_t falling
    linearly from ``c_max`` (published 0.5) to 0 over the first ``dynamic_fraction`` (published
    0.8) of the run, then 0: weakly converged adversarial examples early, converged ones late.

    PGD: at most ``steps`` (10) steps of ``alpha`` (default ``2.5 * eps / steps``, i.e. eps/4 at 10
    steps, as published for CIFAR-10 Linf eps 8/255) from a uniform random start; the first step is
    always taken. Logs ``fosc`` (the mean FOSC reached) and ``pgd_steps`` (the mean number of steps
    per sample). Details: :mod:`robustlab.training.adaptive`.
    """

    name = "dynamic-at"
    defaults = {"c_max": 0.5, "dynamic_fraction": 0.8, "steps": 10, "alpha": None, "random_start": True,
                "eps_warmup": 0.0}

    def validate(self) -> None:
        p = self.params
        _positive_or_none(self.name, "alpha", p["alpha"])
        super().validate()
        if not 0.0 <= p["c_max"] < float("inf"):
            raise RobustlabError(f"recipe {self.name!r}: c_max must be a number >= 0, got {p['c_max']}")
        if not 0.0 < p["dynamic_fraction"] <= 1.0:
            raise RobustlabError(f"recipe {self.name!r}: dynamic_fraction must be in (0, 1], got {p['dynamic_fraction']}")

    def criterion(self) -> float:
        """c_t: the FOSC at which PGD stops, at the current point of the run."""
        p = self.params
        return p["c_max"] * max(0.0, 1.0 - self.progress / p["dynamic_fraction"])

    def attack(self, model, x, y, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_adv, fosc, steps_taken)`` of :func:`dynamic_pgd` at the current criterion."""
        p = self.params
        return dynamic_pgd(model, x, y, self.current_threat(), p["steps"], self.step_size(2.5 / p["steps"]),
                           self.criterion(), "uniform" if p["random_start"] else "none", generator)

    def perturb(self, model, x, y, generator=None):
        return self.attack(model, x, y, generator)[0]

    def loss(self, model, x, y, generator):
        x_adv, value, taken = self.attack(model, x, y, generator)
        logits = model(x_adv)
        logs = {"adv_acc": _accuracy(logits, y), "fosc": value.mean().detach(), "pgd_steps": taken.float().mean()}
        return F.cross_entropy(logits, y), logs
