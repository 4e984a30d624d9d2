"""CW-L2 at its default budget reaches pixels that sit at 0 or 1 (issue 20, defect 1).

In CW's tanh space a pixel at exactly 0 or 1 starts where tanh is flat (|w| = 7.25): 100 Adam steps of
0.01 per round, each round restarting from the clean image, cannot move it, and the per-sample early
abort read its slow start as a stall (the release found nothing here). The model can only be fooled
through such pixels, and the smallest perturbation is known in closed form, so the default must find it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks import create_attack
from robustlab.threat import ThreatModel


class OnlyBlackPixels(nn.Module):
    """Two classes: z0 = 1, z1 = sum of the first 16 pixels (all 0 in the images below). The smallest
    L2 perturbation that flips the prediction raises each of the 16 pixels by 1/16: norm 0.25."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1)[:, :16].sum(dim=1)
        return torch.stack([torch.ones_like(s), s], dim=1)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 4:, :] = torch.tensor([0.5, 1.0, 0.25]).view(3, 1, 1, 1)  # pixels the model ignores
    return x, torch.zeros(3, dtype=torch.long)


def test_default_cw_moves_pixels_at_zero_and_finds_the_minimum():
    x, y = images()
    attack = create_attack("cw", ThreatModel("l2", 0.0))
    result = attack.run(OnlyBlackPixels(), x, y)
    assert result.success.all()
    with torch.no_grad():
        assert (OnlyBlackPixels()(result.x_adv).argmax(1) == 1).all()
    dist = (result.x_adv - x).flatten(1).norm(dim=1)
    assert torch.all(dist >= 0.25 - 1e-4) and torch.all(dist <= 0.25 * 1.01), dist
    # Only the useful pixels moved.
    assert (result.x_adv - x).flatten(1)[:, 16:].abs().max() < 1e-3
    # One gradient per Adam step, at most 9 rounds of 100.
    assert int(result.gradients.max()) <= 900

