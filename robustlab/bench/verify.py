"""Re-verification of every adversarial example an attack claims: the evaluation trusts no attack."""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.checks import check_logits
from robustlab.models.mode import eval_mode
from robustlab.threat import ThreatModel

TOLERANCE = 1e-6


def verify_adversarial(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, threat: ThreatModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which claimed adversarial examples are real: finite, inside [0, 1] and inside the ball (within
    1e-6 after clamping to the box), and misclassified by the model in eval mode (a fresh forward).

    Returns (ok: bool (N,), prediction on x_adv: int64 (N,)).
    """
    inside = threat.contains(x_adv, x, tol=TOLERANCE)
    x_checked = torch.where(torch.isfinite(x_adv), x_adv, x).clamp(threat.lower, threat.upper)
    with eval_mode(model), torch.no_grad():
        pred = check_logits(model(x_checked), x.shape[0]).argmax(dim=1)
    return inside & (pred != y), pred
