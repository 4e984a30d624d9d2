"""Carlini & Wagner (2017) L2 attack: a minimum-norm attack.

For a constant ``c`` it minimizes ``||x' - x||_2^2 + c * max(kappa - m(x'), 0)`` with Adam, where
``m`` is the CW margin (``max_{j != y} z_j - z_y`` untargeted, ``z_t - max_{j != t} z_j`` targeted)
and ``x' = lower + (upper - lower) (tanh(w) + 1) / 2`` (the tanh reparametrization keeps every
iterate inside the box). A binary search adjusts ``c`` per sample (times 10 until a first success,
then bisection), and the smallest-L2 misclassified iterate of the whole search is kept; finally
``line_search`` bisection steps on the segment from the clean image to it (forward passes only, not
in the paper; 0 turns them off) move it onto the decision boundary.

The Linf CW attack is PGD on the same margin: ``pgd:loss=cw`` (not duplicated here).

Per sample, each inner step is one forward pass and one input gradient (on the same pass: the
success of an iterate is read from the logits computed for its gradient). With ``abort_early`` a
sample that has been adversarial in the current round leaves it once its own objective has stopped
improving (the best value of the last tenth of ``steps`` against the best before; the objective
contains the L2 distance that decides, so a stall means no closer point is coming); a sample not yet
adversarial in the round runs all its steps. A sample misclassified at its starting point (the
clean image, up to the tanh round trip) is not attacked further.

Two departures from the paper make its budget (9 x 100 steps of 0.01 here, up to 10,000 steps in
the paper) reach pixels at 0 or 1. Such a pixel starts where tanh is flat (``|w0| = 7.25``, the
``1 - 1e-6`` clamp); an Adam step moves ``w`` by at most about ``lr``, so a round that restarts from
the clean image moves it by ~1e-5 -- on MNIST, where most pixels are exactly 0 or 1, that left most
points of a standard LeNet unbroken (benchmarks/results/cw_default_budget.txt). (1) A round that
found no adversarial hands its end point to the next round (with the larger constant) instead of
restarting from the clean image, so the travel adds up over the rounds; a round after a success
restarts from the clean image, as in the paper. (2) The early abort waits for the round's first
success: before it, the objective crawls while such pixels leave the flat end of tanh, which the
stall test (1e-4 relative) took for a stall.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.deepfool import bisect_to_boundary
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin
from robustlab.threat import norms


class BinarySearch:
    """Per-sample constant ``c``: x10 until the first success, then bisection (CW's schedule)."""

    def __init__(self, n: int, initial: float, device: torch.device) -> None:
        self.const = torch.full((n,), initial, dtype=torch.float64, device=device)
        self.lo = torch.zeros(n, dtype=torch.float64, device=device)
        self.hi = torch.full((n,), math.inf, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor, found: torch.Tensor) -> None:
        """``rows`` took part in the last round; ``found[i]``: row ``rows[i]`` found an adversarial."""
        c = self.const[rows]
        hi = torch.where(found, c, self.hi[rows])
        lo = torch.where(found, self.lo[rows], c)
        self.hi[rows], self.lo[rows] = hi, lo
        self.const[rows] = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)

    def last_round(self) -> None:
        """CW's final repeat (with 10 or more rounds): run again at the best constant found."""
        self.const = torch.minimum(self.hi, torch.full_like(self.hi, 1e10))


def validate_search_params(attack: Attack) -> None:
    """Shared checks of the CW-style parameters (binary_steps, lr, confidence, initial_const)."""
    p, name = attack.params, attack.name
    if p["binary_steps"] < 1:
        raise RobustlabError(f"attack {name!r}: binary_steps must be >= 1, got {p['binary_steps']}")
    if not p["lr"] > 0:
        raise RobustlabError(f"attack {name!r}: lr must be > 0, got {p['lr']}")
    if p["confidence"] < 0:
        raise RobustlabError(f"attack {name!r}: confidence must be >= 0, got {p['confidence']}")
    if not p["initial_const"] > 0:
        raise RobustlabError(f"attack {name!r}: initial_const must be > 0, got {p['initial_const']}")
    if p["line_search"] < 0:
        raise RobustlabError(f"attack {name!r}: line_search must be >= 0, got {p['line_search']}")


@register_attack
class CarliniWagnerL2(Attack):
    """CW-L2 (minimum-norm; targeted or untargeted).

    steps: Adam steps per constant; binary_steps: constants tried per sample; lr: Adam's step size
    (in the tanh space); confidence: the margin kappa an adversarial must clear; initial_const: the
    first ``c``; abort_early: a sample leaves the current round once its objective stalls;
    line_search:
    final bisection steps towards the clean image (one forward pass each).

    Returns the smallest-L2 adversarial found per sample (``success`` = found, wherever it lies);
    samples without one come back unchanged.
    """

    name = "cw"
    defaults = {
        "steps": 100, "binary_steps": 9, "lr": 0.01, "confidence": 0.0, "initial_const": 1e-3, "abort_early": True,
        "line_search": 10,
    }
    norms = ("l2",)
    minimum_norm = True

    def validate(self) -> None:
        super().validate()
        validate_search_params(self)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n, dev = x.shape[0], x.device
        mid, half = (self.threat.lower + self.threat.upper) / 2, (self.threat.upper - self.threat.lower) / 2
        w0 = torch.atanh(((x - mid) / half).clamp(-1, 1) * (1 - 1e-6))
        x_rec = mid + half * torch.tanh(w0)  # where delta = 0 lands: the zero of the distance term
        # A sample misclassified at delta = 0 is done: nothing closer is reachable (distance ~1e-6).
        done_at = norms(x_rec - x, "l2")
        kappa = p["confidence"]
        search = BinarySearch(n, p["initial_const"], dev)
        best, best_norm = x.clone(), torch.full((n,), math.inf, dtype=x.dtype, device=dev)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        check_every = math.ceil(p["steps"] / 10)
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
        # Where each sample's next round starts in tanh space (relative to w0): the clean image after
        # a round that found an adversarial (as in the paper), else where the round ended.
        carry = torch.zeros_like(w0)
        for round_ in range(p["binary_steps"]):
            if p["binary_steps"] >= 10 and round_ == p["binary_steps"] - 1:
                search.last_round()
            rows = (best_norm > done_at).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                break
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            idx, w_base, target, ref, yy = rows, w0[rows], x_rec[rows], x[rows], y[rows]
            c = search.const[rows].to(x.dtype)
            delta = carry[rows]
            m1, m2 = torch.zeros_like(delta), torch.zeros_like(delta)
            prev = torch.full((rows.numel(),), math.inf, dtype=x.dtype, device=dev)
            window = prev.clone()  # the best objective since the last stall test
            for it in range(p["steps"]):
                d_leaf = delta.detach().requires_grad_(True)
                with torch.enable_grad():
                    x_adv = mid + half * torch.tanh(w_base + d_leaf)
                    out = check_logits(model(x_adv), x_adv.shape[0])
                    margin = cw_margin(out, yy, self.targeted)
                    dist2 = (x_adv - target).flatten(1).square().sum(dim=1)
                    loss = dist2 + c * (kappa - margin).clamp_min(0)
                    (g,) = torch.autograd.grad(loss.sum(), d_leaf)
                grads[idx] += 1
                forwards[idx] += 1
                x_adv, out, margin, loss = x_adv.detach(), out.detach(), margin.detach(), loss.detach()
                adv = self._is_adversarial(out, yy)
                if bool(adv.any()):
                    l2 = norms(x_adv - ref, "l2")
                    better = adv & (l2 < best_norm[idx])
                    best[idx[better]] = x_adv[better]
                    best_norm[idx[better]] = l2[better]
                    found[idx[adv]] = True
                if it == p["steps"] - 1:
                    break
                keep = best_norm[idx] > done_at[idx]
                if p["abort_early"]:
                    # A sample that was adversarial in this round stops once no step in the last
                    # tenth of the steps improved its best objective (Adam's steps are not monotone,
                    # so the best, not the last, counts). One not yet adversarial runs on: its
                    # objective crawls while pixels at 0 or 1 leave the flat end of tanh, which is
                    # no stall.
                    window = torch.minimum(window, loss)
                    if it % check_every == 0:
                        keep &= (window <= 0.9999 * prev) | ~found[idx]
                        prev, window = torch.minimum(prev, window), torch.full_like(window, math.inf)
                if not bool(keep.all()):
                    gone = idx[~keep]
                    carry[gone] = torch.where(found[gone].view(-1, *[1] * (x.dim() - 1)), 0.0, delta[~keep])
                    idx, w_base, target, ref = idx[keep], w_base[keep], target[keep], ref[keep]
                    yy, c = yy[keep], c[keep]
                    delta, m1, m2, g = delta[keep], m1[keep], m2[keep], g[keep]
                    prev, window = prev[keep], window[keep]
                    if idx.numel() == 0:
                        break
                # Adam (element-wise, so each sample's trajectory is its own).
                t = it + 1
                m1 = beta1 * m1 + (1 - beta1) * g
                m2 = beta2 * m2 + (1 - beta2) * g.square()
                step = (m1 / (1 - beta1**t)) / ((m2 / (1 - beta2**t)).sqrt() + adam_eps)
                delta = delta - p["lr"] * step
            if idx.numel():
                carry[idx] = torch.where(found[idx].view(-1, *[1] * (x.dim() - 1)), 0.0, delta)
            search.update(rows, found[rows])
        bisect_to_boundary(model, x, y, best, best_norm, "l2", p["line_search"], self._is_adversarial, forwards,
                           skip=best_norm <= done_at)
        return AttackResult(best, torch.isfinite(best_norm), grads, forwards)

    def _is_adversarial(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Misclassified (or the target hit) with a margin of at least ``confidence``."""
        margin = cw_margin(logits, labels, self.targeted)
        return self.is_success(logits, labels) & (margin >= self.params["confidence"])
