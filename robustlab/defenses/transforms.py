"""Input-transformation defenses: batched torch operations in front of the model."""

from __future__ import annotations

import torch

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


@register_defense
class BitDepth(Defense):
    """Bit-depth reduction (feature squeezing, Xu et al. 2018): each pixel rounded to one of
    ``2**bits`` levels. Not differentiable (its gradient is zero almost everywhere): attacks go
    through it by BPDA with the identity."""

    name = "bit-depth"
    defaults = {"bits": 4}
    differentiable = False

    def validate(self) -> None:
        if not 1 <= self.params["bits"] <= 16:
            raise RobustlabError(f"defense 'bit-depth': bits must be in 1..16, got {self.params['bits']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        levels = 2 ** self.params["bits"] - 1
        return torch.round(x * levels) / levels


@register_defense
class GaussianNoise(Defense):
    """Gaussian noise added to the input (clipped to [0, 1]), a fresh draw at every call; predictions
    are the majority vote over ``draws`` draws, and attacks average gradients over as many (EOT)."""

    name = "noise"
    defaults = {"sigma": 0.1, "draws": 8}

    randomized = True

    def validate(self) -> None:
        if not self.params["sigma"] > 0:
            raise RobustlabError(f"defense 'noise': sigma must be > 0, got {self.params['sigma']}")
        if self.params["draws"] < 1:
            raise RobustlabError(f"defense 'noise': draws must be >= 1, got {self.params['draws']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + self.params["sigma"] * noise).clamp(0.0, 1.0)
