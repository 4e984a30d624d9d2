"""Re-verification of every adversarial example an attack claims: the evaluation trusts no attack."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from robustlab.models.runtime import eval_mode
from robustlab.predictor import predict
from robustlab.threat import ThreatModel

TOLERANCE = 1e-6


@dataclass
class Verification:
    """Per claimed example: ``misclassified`` (finite, in the box, misclassified by a fresh forward in
    eval mode), ``inside`` (in the ball within 1e-6 after clamping), ``ok`` (both: it counts),
    ``pred`` (the model's prediction on it) and ``distance`` (its perturbation norm)."""

    ok: torch.Tensor
    misclassified: torch.Tensor
    inside: torch.Tensor
    pred: torch.Tensor
    distance: torch.Tensor


def verify_adversarial(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
    generator: torch.Generator | None = None,
) -> Verification:
    """Which claimed adversarial examples are real: finite, inside [0, 1] and inside the ball (within
    1e-6 after clamping to the box), and misclassified by the model in eval mode (a fresh prediction,
    :func:`robustlab.predictor.predict`: a voting defense votes with draws from ``generator``; an
    abstention is not a correct prediction, so it counts)."""
    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
    flat = x_adv.flatten(1)
    in_box = ((flat >= threat.lower - TOLERANCE) & (flat <= threat.upper + TOLERANCE)).all(dim=1)
    x_checked = torch.where(torch.isfinite(x_adv), x_adv, x).clamp(threat.lower, threat.upper)
    with eval_mode(model), torch.no_grad():
        pred = predict(model, x_checked, generator)
    misclassified = finite & in_box & (pred != y)
    inside = threat.contains(x_adv, x, tol=TOLERANCE)
    return Verification(inside & misclassified, misclassified, inside, pred, threat.distance(x_checked, x))
