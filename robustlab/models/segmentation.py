"""Segmentation networks: images (N, C, H, W) to per-pixel logits (N, classes, H, W).

``seg_unet``: a compact U-Net (Ronneberger et al. 2015) for the scene data sets
(:mod:`robustlab.data.scenes`): ``depth`` levels of two 3x3 conv-BN-ReLU blocks, the width doubling
at each 2x2 max-pool down from ``width``, back up by bilinear upsampling concatenated with the skip of
the same level, and a 1x1 convolution to the class logits. Any input size works (an upsampled map is
resized to its skip's size), the output has the input's size.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.registry import register_model

SCENES_MEAN, SCENES_STD = (0.2,), (0.25,)  # grey scenes of robustlab.data.scenes (about 0.2 / 0.24)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class UNet(nn.Module):
    """A U-Net with ``depth`` poolings; channels ``width * 2**level``."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 0:
            raise RobustlabError(f"seg_unet: width must be >= 1 and depth >= 0, got {width} and {depth}")
        widths = [width * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])]
                                  + [_block(a, b) for a, b in pairwise(widths)])
        self.up = nn.ModuleList([_block(b + a, a) for a, b in pairwise(widths)][::-1])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            if k:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


@register_model("seg_unet", in_channels=1, input_size=(64, 64), mean=SCENES_MEAN, std=SCENES_STD,
                dataset="scenes_mnist", task="segmentation")
def seg_unet(num_classes: int = 11, in_channels: int = 1, width: int = 16, depth: int = 2) -> nn.Module:
    """Compact U-Net for the scene data sets: per-pixel logits (N, num_classes, H, W); ``width``
    channels at full resolution, ``depth`` poolings (each halves the size and doubles the width)."""
    return UNet(num_classes, in_channels, int(width), int(depth))
