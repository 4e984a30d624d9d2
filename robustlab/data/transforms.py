"""Image transforms on whole data sets (pixel values stay in [0, 1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_images(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize float images (N, C, H, W) in [0, 1] to (N, C, size, size), bilinear with antialiasing
    when shrinking, clamped back into [0, 1]. Works in chunks to bound peak memory."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = [
        F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
        for part in torch.split(x, chunk)
    ]
    return torch.cat(out)
