"""The adaptive attack on a classifier guarded by a detector: find x' in the threat model that the
classifier gets wrong AND the detector does not flag (its score at or under the threshold fixed on
clean images), as Carlini & Wagner (2017, "Adversarial examples are not easily detected") and
Bryniarski et al. (2022, "Evading adversarial example detection defenses with orthogonal projected
gradient descent") attack detectors.

The detector enters only as a score callable ``score(x) -> (N,)`` (higher: more suspicious),
differentiable in ``x``; a non-differentiable step inside it (bit-depth reduction) must already be
wrapped in BPDA by whoever builds the callable (``robustlab.defenses.detection`` does), so its forward
value stays exact and only its gradient is the surrogate's. Attacks do not import defenses.

Per sample, minimized by projected steepest descent (sign steps under Linf, cosine step schedule):

    margin(x') + w * relu(score(x') - target) / scale

- ``margin``: the CW margin ``z_y - max_{j != y} z_j``, floored at ``-kappa`` (enough to misclassify,
  then the budget goes to the detector);
- ``target = threshold - margin_frac * scale``: the detector's score is pushed a little under the
  threshold, and not further once it is there (a hinge at the threshold);
- ``w``: the trade-off, searched per sample over ``rounds`` rounds as CW search their constant: a round
  that ends flagged raises it, one that ends unflagged but correctly classified lowers it (geometric
  bisection once both sides are known, else x10 / /10). Each round continues from the previous end point
  (a round where both constraints failed restarts at a random point of the ball).
- ``selective`` rounds (Bryniarski et al.'s selective PGD): each step follows only the constraint the
  point violates now (the classifier while it is correct, else the detector while it flags), no weight.
  With ``selective_first`` the first round is selective and the weighted search follows.
- a ``consistent`` round, before those, when the caller gives ``views`` (``views(x) -> [x1, x2, ...]``: the
  transformed copies of the input a detector compares the classifier's outputs on, e.g. feature
  squeezing's squeezed images, with BPDA where not differentiable): every view and the input itself are
  pushed to one common wrong class, kappa past the boundary (the sum of their targeted CW margins; the
  class is the wrong one with the largest logit summed over the views, per step). A detector that
  flags disagreement between views has nothing to flag once all agree confidently, and this is the
  route around it (He et al. 2017 attack feature squeezing through all squeezers at once); the
  detector term alone rarely finds it, because its gradient vanishes where the views agree on the
  true class. The score is still checked, exactly, every step. The points it leaves start the other
  rounds from where it started them, so it only adds (``steps`` more per point).

A sample is done the first step its iterate is misclassified and unflagged (checked on the exact score);
the result keeps that iterate, else the last one. Costs: one model forward+backward and one detector
score forward+backward per step and sample still attacked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel

Score = Callable[[torch.Tensor], torch.Tensor]
Views = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass
class DetectorAwareOptions:
    """The attack's settings (all JSON, recorded with a run)."""

    steps: int = 200           # steps per round
    rounds: int = 5            # rounds of the trade-off search (the first selective with selective_first)
    weight: float = 1.0        # initial trade-off w
    kappa: float = 5.0         # margin floor (logit units): how far past the boundary the classifier is pushed
    margin_frac: float = 0.05  # target = threshold - margin_frac * scale
    step_max: float = 0.25     # first step size, as a fraction of eps (cosine decay to step_max / 20)
    selective_first: bool = True
    views_first: bool = True   # a consistent-views round first, where the caller gives the detector's views

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rounds < 1 or not self.weight > 0 or self.kappa < 0 or self.step_max <= 0:
            raise RobustlabError("detector-aware attack: steps and rounds must be >= 1, weight > 0, kappa >= 0 "
                                 "and step_max > 0")

    def config(self) -> dict[str, Any]:
        return {"name": "detector-aware", "params": asdict(self)}


@dataclass
class DetectorAwareResult:
    """``x_adv`` (in the ball), ``success`` (misclassified and not flagged, per sample), the final
    ``score`` and ``pred`` of each x_adv, and the gradient count per sample (model + detector)."""

    x_adv: torch.Tensor
    success: torch.Tensor
    score: torch.Tensor
    pred: torch.Tensor
    gradients: torch.Tensor


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return true - other


def detector_aware_attack(model: nn.Module, score: Score, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                          threshold: float, scale: float | None = None, options: DetectorAwareOptions | None = None,
                          generator: torch.Generator | None = None,
                          status: Callable[[str, int], None] | None = None,
                          views: Views | None = None, init: torch.Tensor | None = None) -> DetectorAwareResult:
    """Attack ``model`` and the detector ``score`` together (see the module docstring). ``threshold``:
    the detector flags scores above it; ``scale``: the spread of clean scores (e.g. their standard
    deviation) that makes the detector term comparable to logits (default: |threshold|, at least 1e-6);
    ``views``: the detector's views of an input, for a consistent round before the others; ``init``:
    where to start (e.g. another attack's points; projected into the ball), instead of a random point."""
    o = options or DetectorAwareOptions()
    n = x.shape[0]
    scale = float(scale) if scale is not None and scale > 0 else max(abs(float(threshold)), 1e-6)
    target = float(threshold) - o.margin_frac * scale
    view = (-1, *[1] * (x.dim() - 1))
    x_cur = threat.random_init(x, generator, radius="uniform") if init is None else threat.project(init.detach(), x)
    best = x_cur.clone()
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    w = torch.full((n,), float(o.weight), device=x.device)
    lo = torch.zeros(n, device=x.device)
    hi = torch.full((n,), math.inf, device=x.device)
    grads = torch.zeros(n, dtype=torch.long, device=x.device)
    last_score = torch.zeros(n, device=x.device)
    last_pred = y.clone()
    kinds = ["consistent"] * (views is not None and o.views_first) + [
        "selective" if o.selective_first and r == 0 else "weighted" for r in range(o.rounds)]
    for r, mode in enumerate(kinds):
        idx = (~done).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        consistent, selective = mode == "consistent", mode == "selective"
        if status:
            status(f"detector-aware round {r + 1}/{len(kinds)} ({mode})", int(idx.numel()))
        xs, x0, ys, wi = x_cur[idx].clone(), x[idx], y[idx], w[idx]
        live = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
        for t in range(o.steps + 1):
            z = xs.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(z)
                m = _margin(logits, ys)
                if consistent:  # every view to one wrong class, kappa past the boundary
                    outs = [logits, *(model(v) for v in views(z))]
                    common = torch.stack(outs).sum(0).scatter(1, ys[:, None], float("-inf")).argmax(1)
                    loss = sum((-_margin(out, common)).clamp_min(-o.kappa) for out in outs)
                    with torch.no_grad():
                        s = score(z)
                else:
                    s = score(z)
                    cls = m.clamp_min(-o.kappa)
                    det = torch.relu(s - target) / scale
                    if selective:  # follow the violated constraint only
                        loss = torch.where(m >= 0, cls, det)
                    else:
                        loss = cls + wi * det
                g = torch.autograd.grad(loss.sum(), z)[0] if t < o.steps else None
            with torch.no_grad():
                ok = live & (m < 0) & (s <= threshold)
                if ok.any():
                    hit = idx[ok]
                    best[hit] = z.detach()[ok]
                    done[hit] = True
                    last_score[hit], last_pred[hit] = s.detach()[ok], logits.argmax(1)[ok]
                    live &= ~ok
                grads[idx[live]] += int(t < o.steps)
                if t == o.steps or not live.any():
                    break
                frac = 0.5 * (1 + math.cos(math.pi * t / o.steps))
                alpha = threat.eps * o.step_max * (0.05 + 0.95 * frac)
                step = threat.steepest_step(g, alpha, xs) * live.view(view)
                xs = threat.project(xs - step, x0)
        with torch.no_grad():
            failed = live
            fi = idx[failed]
            if fi.numel() == 0:
                continue
            s_end, m_end = s.detach()[failed], m.detach()[failed]
            if not consistent:  # the rounds after a consistent one start where it started
                x_cur[fi] = xs[failed]
            best[fi] = xs[failed]
            last_score[fi], last_pred[fi] = s_end, logits.detach().argmax(1)[failed]
            if selective or consistent:
                continue  # the weighted search starts from here with the initial weight
            flagged, correct = s_end > threshold, m_end >= 0
            up = flagged & ~correct   # misclassified but flagged: weigh the detector more
            down = correct & ~flagged  # unflagged but correct: weigh it less
            lo[fi[up]] = w[fi[up]]
            hi[fi[down]] = w[fi[down]]
            both = torch.isfinite(hi[fi]) & (lo[fi] > 0)
            new = torch.where(both, (lo[fi] * hi[fi]).sqrt(), w[fi])
            new = torch.where(up & ~both, w[fi] * 10, new)
            new = torch.where(down & ~both, w[fi] / 10, new)
            w[fi] = new
            stuck = fi[flagged & correct]  # neither constraint met: a fresh start
            if stuck.numel():
                x_cur[stuck] = threat.random_init(x[stuck], generator, radius="uniform")
    return DetectorAwareResult(best.detach(), done, last_score, last_pred, grads)
