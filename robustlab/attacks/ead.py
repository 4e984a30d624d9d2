"""EAD, elastic-net attacks (Chen et al. 2018): a minimum-norm L1 attack.

For a constant ``c`` it minimizes ``c * max(kappa - m(x'), 0) + ||x' - x||_2^2 + beta ||x' - x||_1``
over the box by (F)ISTA: a gradient step on the smooth part, then the projected shrinkage-thresholding
operator (each coordinate of ``x' - x`` shrunk towards 0 by ``beta`` and clipped to the box), with a
square-root decaying step size; FISTA adds Nesterov momentum (its extrapolated point is clipped to the
box, so the model is never queried outside it). ``m`` is the CW margin. A binary search adjusts
``c`` per sample (times 10 until a first success, then bisection). Among the misclassified iterates
the decision rule keeps the smallest L1 distance (``l1``, the default here: the threat model's norm)
or the smallest elastic-net value (``en``); finally ``line_search`` bisection steps on the segment
from the clean image to it (forward passes only, not in the paper; 0 turns them off) move it onto
the decision boundary.

Per sample, an inner step costs one input gradient and its forward pass; with FISTA, one more
forward pass checks the new iterate (the gradient is taken at the extrapolated point); with ISTA the
gradient's pass checks the iterate, and each round ends with one forward pass on its last iterate.
With ``abort_early`` a sample that has found no adversarial in a round leaves it once its own
objective has stopped improving (checked every tenth of ``steps``: its c is too small; a sample
that has found one goes on, as the elastic-net objective flattens out before the L1 distance that
decides does); a sample already misclassified (distance 0) is not attacked.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.cw import BinarySearch, validate_search_params
from robustlab.attacks.deepfool import bisect_to_boundary
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin


def shrink(z: torch.Tensor, x: torch.Tensor, beta: float, lower: float, upper: float) -> torch.Tensor:
    """The projected shrinkage-thresholding operator: ``x + soft(z - x, beta)`` clipped to the box."""
    d = z - x
    out = torch.where(d > beta, (z - beta).clamp(max=upper), x)
    return torch.where(d < -beta, (z + beta).clamp(min=lower), out)


class _Record:
    """Per sample: the best adversarial so far, its decision-rule score and L1 distance, and
    whether the current round found any adversarial (for the binary search)."""

    def __init__(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.best = x.clone()
        self.score = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        self.l1 = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        self.found = torch.zeros(n, dtype=torch.bool, device=x.device)


@register_attack
class EAD(Attack):
    """EAD-L1 (minimum-norm; targeted or untargeted).

    steps: (F)ISTA iterations per constant; binary_steps: constants tried per sample; lr: initial
    step size; beta: the L1 weight (also the shrinkage threshold); confidence: the margin kappa an
    adversarial must clear; initial_const: the first ``c``; decision_rule: ``l1`` or ``en``;
    fista: Nesterov momentum (else plain ISTA); abort_early: a sample without an adversarial in
    the current round leaves it once its objective stalls; line_search: final bisection steps
    towards the clean image (one forward pass each).

    Returns the best adversarial per sample under the decision rule (``success`` = found, wherever
    it lies); samples without one come back unchanged.
    """

    name = "ead"
    defaults = {
        "steps": 100, "binary_steps": 9, "lr": 0.01, "beta": 1e-3, "confidence": 0.0, "initial_const": 1e-3,
        "decision_rule": "l1", "fista": True, "abort_early": True, "line_search": 10,
    }
    choices = {"decision_rule": ("l1", "en")}
    norms = ("l1",)
    minimum_norm = True

    def validate(self) -> None:
        super().validate()
        validate_search_params(self)
        if self.params["beta"] < 0:
            raise RobustlabError(f"attack {self.name!r}: beta must be >= 0, got {self.params['beta']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        n, dev = x.shape[0], x.device
        lower, upper = self.threat.lower, self.threat.upper
        kappa, beta, steps, fista = p["confidence"], p["beta"], p["steps"], p["fista"]
        search = BinarySearch(n, p["initial_const"], dev)
        rec = _Record(x)
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        check_every = math.ceil(steps / 10)
        for round_ in range(p["binary_steps"]):
            if p["binary_steps"] >= 10 and round_ == p["binary_steps"] - 1:
                search.last_round()
            rows = (rec.l1 > 0).nonzero(as_tuple=True)[0]  # distance 0 cannot be improved
            if rows.numel() == 0:
                break
            rec.found = torch.zeros(n, dtype=torch.bool, device=dev)
            # Per-sample state of this round, one row per sample still in the inner loop.
            s = {"idx": rows, "x0": x[rows], "y": y[rows], "c": search.const[rows].to(x.dtype), "xk": x[rows].clone(),
                 "prev": torch.full((rows.numel(),), math.inf, dtype=x.dtype, device=dev)}
            s["window"] = s["prev"].clone()  # the best objective since the last stall test
            s["yk"] = s["xk"]
            for it in range(steps):
                y_leaf = s["yk"].detach().requires_grad_(True)
                with torch.enable_grad():
                    out = check_logits(model(y_leaf), y_leaf.shape[0])
                    margin = cw_margin(out, s["y"], self.targeted)
                    dist2 = (y_leaf - s["x0"]).flatten(1).square().sum(dim=1)
                    smooth = s["c"] * (kappa - margin).clamp_min(0) + dist2
                    (g,) = torch.autograd.grad(smooth.sum(), y_leaf)
                grads[s["idx"]] += 1
                forwards[s["idx"]] += 1
                s["g"] = g
                if not fista or it == 0:
                    # Here y_k is the iterate x_k (ISTA; FISTA's start), so its logits are known.
                    s = self._record(rec, s, s["xk"], out.detach(), stall_test=not fista and it % check_every == 0)
                    if s["idx"].numel() == 0:
                        break
                lr = p["lr"] * (1 - it / steps) ** 0.5
                x_new = shrink(s["yk"] - lr * s["g"], s["x0"], beta, lower, upper)
                s["yk"] = (x_new + it / (it + 3) * (x_new - s["xk"])).clamp(lower, upper) if fista else x_new
                s["xk"] = x_new
                if fista:
                    out_x = self.logits(model, x_new)
                    forwards[s["idx"]] += 1
                    s = self._record(rec, s, x_new, out_x, stall_test=it % check_every == 0)
                    if s["idx"].numel() == 0:
                        break
            else:
                if not fista:
                    # The last ISTA iterate has not been evaluated yet.
                    out_x = self.logits(model, s["xk"])
                    forwards[s["idx"]] += 1
                    self._record(rec, s, s["xk"], out_x, stall_test=False)
            search.update(rows, rec.found[rows])
        bisect_to_boundary(model, x, y, rec.best, rec.l1, "l1", p["line_search"], self._is_adversarial, forwards)
        return AttackResult(rec.best, torch.isfinite(rec.l1), grads, forwards)

    def _is_adversarial(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Misclassified (or the target hit) with a margin of at least ``confidence``."""
        margin = cw_margin(logits, labels, self.targeted)
        return self.is_success(logits, labels) & (margin >= self.params["confidence"])

    def _record(self, rec: "_Record", s: dict, point: torch.Tensor, out: torch.Tensor, stall_test: bool) -> dict:
        """Keep the misclassified ``point`` rows that beat the best under the decision rule; with
        ``stall_test`` (and abort_early), drop the rows whose objective stalled without a success."""
        p = self.params
        kappa, beta = p["confidence"], p["beta"]
        margin = cw_margin(out, s["y"], self.targeted)
        delta = (point - s["x0"]).flatten(1)
        l1, l2sq = delta.abs().sum(dim=1), delta.square().sum(dim=1)
        adv = self._is_adversarial(out, s["y"])
        if bool(adv.any()):
            score = l1 if p["decision_rule"] == "l1" else beta * l1 + l2sq
            better = adv & (score < rec.score[s["idx"]])
            hit = s["idx"][better]
            rec.best[hit] = point[better]
            rec.score[hit] = score[better]
            rec.l1[hit] = l1[better]
            rec.found[s["idx"][adv]] = True
        keep = rec.l1[s["idx"]] > 0  # a sample misclassified at distance 0 is done
        if p["abort_early"]:
            # A sample that has not found an adversarial in this round stops once no iterate in the
            # last tenth of the steps improved its best objective ((F)ISTA is not monotone): its c is
            # too small. One that has found one goes on: the elastic-net objective flattens out while
            # the shrinkage still makes the perturbation sparser (smaller in L1, which decides).
            objective = s["c"] * (kappa - margin).clamp_min(0) + l2sq + beta * l1
            s["window"] = torch.minimum(s["window"], objective)
            if stall_test:
                keep &= (s["window"] <= 0.9999 * s["prev"]) | rec.found[s["idx"]]
                s["prev"] = torch.minimum(s["prev"], s["window"])
                s["window"] = torch.full_like(s["window"], math.inf)
        if bool(keep.all()):
            return s
        return {key: value[keep] for key, value in s.items()}
