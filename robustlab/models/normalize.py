"""The Normalize layer: per-channel (x - mean) / std in front of a network, so models take [0, 1] images."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from robustlab.errors import RobustlabError


def as_channel_tuple(values: float | Sequence[float], name: str) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of floats (a single number becomes a 1-tuple)."""
    if isinstance(values, (int, float)):
        return (float(values),)
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise RobustlabError(f"{name} must be a number or a list of numbers, one per channel; got {values!r}") from None
    if not out:
        raise RobustlabError(f"{name} must have one value per channel, got an empty list")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for NCHW images in [0, 1].

    ``mean`` and ``std`` (one value per channel, in [0, 1] pixel units) are stored as buffers of
    shape (1, C, 1, 1), so they travel with the state dict and follow ``.to(device)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        m = as_channel_tuple(mean, "mean")
        s = as_channel_tuple(std, "std")
        if len(m) != len(s):
            raise RobustlabError(f"mean has {len(m)} values but std has {len(s)}; give one of each per channel")
        if any(not v > 0 for v in s):
            raise RobustlabError(f"std values must all be > 0, got {s}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        """Number of channels C this layer normalizes."""
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images, same shape as ``x`` (N, C, H, W)."""
        c = self.channels
        if x.dim() == 4 and c != 1 and x.shape[1] != c:
            raise RobustlabError(
                f"the model normalizes {c}-channel images but got input of shape {tuple(x.shape)}; "
                f"pass images as N x {c} x H x W"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
