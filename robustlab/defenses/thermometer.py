"""Thermometer encoding (Buckman et al. 2018): each pixel value becomes ``levels`` binary channels,
channel k being 1 where the value exceeds k / levels. The model behind it takes ``levels`` times the
image's channels and must be trained on the encoding (``robustlab train --defense thermometer``, which
records the defense in the model's card so evaluation applies it).

The encoding is a step function (zero gradient almost everywhere). Two adaptive attacks:

- BPDA with its piecewise-linear relaxation, channel k = clamp(levels * x - k, 0, 1), which equals
  the encoding at every multiple of 1 / levels (Athalye et al. 2018): what every gradient attack
  differentiates on the defended model;
- LS-PGA (Buckman et al. 2018), which the defense declares (``adaptive_attacks``): an ascent over a
  distribution on each pixel's reachable *buckets* (the codes a pixel can take inside the threat
  model), the attack :mod:`robustlab.attacks.lspga`, through the bucket interface below.

Buckets: the code of a value is fixed by how many thresholds it exceeds, its bucket b in 0..levels
(bucket 0 is the value 0 and below, bucket b >= 1 the interval ((b-1)/levels, b/levels]); the code of
bucket b has its first b channels on. :meth:`Thermometer.buckets`, :meth:`Thermometer.relax` (a
distribution over buckets to the expected code) and :meth:`Thermometer.bucket_value` (an image value
with a given bucket inside an interval) are what LS-PGA needs.
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
    adaptive_attacks = ("ls-pga",)

    def validate(self) -> None:
        if not 2 <= self.params["levels"] <= 64:
            raise RobustlabError(f"defense 'thermometer': levels must be in 2..64, got {self.params['levels']}")

    @property
    def levels(self) -> int:
        return int(self.params["levels"])

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (_steps(x, self.levels) > 0).to(x.dtype).flatten(1, 2)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return _steps(x, self.levels).clamp(0, 1).flatten(1, 2)

    def output_channels(self, channels: int) -> int:
        return channels * self.levels

    # ------------------------------------------------------------------ buckets (LS-PGA)

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) int64: each value's bucket, the number of channels on in its code (the same
        comparison as :meth:`transform`, so the two never disagree)."""
        return (_steps(x, self.levels) > 0).sum(dim=2)

    def relax(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, C, levels + 1, H, W) distributions over buckets -> (N, C * levels, H, W): the expected
        code, channel k being the probability of a bucket above k. A one-hot distribution gives the
        bucket's code exactly."""
        if probs.dim() != 5 or probs.shape[2] != self.levels + 1:
            raise RobustlabError(f"thermometer.relax: expected (N, C, {self.levels + 1}, H, W), got {tuple(probs.shape)}")
        above = probs.flip(2).cumsum(2).flip(2)[:, :, 1:]  # channel k: sum of the buckets k+1 .. levels
        return above.flatten(1, 2)

    def bucket_value(self, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """A value in [lo, hi] whose bucket is ``b``, for buckets between those of ``lo`` and ``hi``:
        the middle of the bucket's interval within [lo, hi] (away from the thresholds), else ``hi`` or
        ``lo`` themselves where rounding puts the middle in a neighbour."""
        levels = self.levels
        bf = b.to(lo.dtype)
        left = torch.maximum(lo, (bf - 1) / levels)
        right = torch.minimum(hi, bf / levels)
        v = ((left + right) / 2).clamp(lo, hi)
        v = torch.where(self.buckets(v) == b, v, torch.where(self.buckets(hi) == b, hi, lo))
        return v
