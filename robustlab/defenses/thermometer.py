"""Thermometer encoding (Buckman et al. 2018): each pixel value becomes ``levels`` binary channels,
channel k being 1 where the value exceeds k / levels. The model behind it takes ``levels`` times the
image's channels and must be trained on the encoding (``robustlab train --defense thermometer``, which
records the defense in the model's card so evaluation applies it).

The encoding is a step function (zero gradient almost everywhere). Athalye et al. (2018) broke it by
BPDA with its piecewise-linear relaxation, channel k = clamp(levels * x - k, 0, 1), which equals the
encoding at every multiple of 1 / levels; the adaptive attack uses that relaxation.
"""

from __future__ import annotations

import torch

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


def _steps(x: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, levels, H, W): levels * x - k for k = 0 .. levels-1."""
    k = torch.arange(levels, dtype=x.dtype, device=x.device).view(1, 1, levels, 1, 1)
    return x.unsqueeze(2) * levels - k


@register_defense
class Thermometer(Defense):
    """Thermometer encoding with ``levels`` levels (2..64): C channels in, C * levels out (channel
    c * levels + k is 1 where channel c exceeds k / levels)."""

    name = "thermometer"
    defaults = {"levels": 16}
    differentiable = False

    def validate(self) -> None:
        if not 2 <= self.params["levels"] <= 64:
            raise RobustlabError(f"defense 'thermometer': levels must be in 2..64, got {self.params['levels']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        levels = self.params["levels"]
        return (_steps(x, levels) > 0).to(x.dtype).flatten(1, 2)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return _steps(x, self.params["levels"]).clamp(0, 1).flatten(1, 2)

    def output_channels(self, channels: int) -> int:
        return channels * self.params["levels"]
