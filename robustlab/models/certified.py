"""Small networks for certified training by bound propagation: the DM-small and DM-medium CNNs of
Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust
Models" (2018), as used again by Zhang et al. (CROWN-IBP, ICLR 2020). Plain chains of conv, ReLU,
flatten and linear layers (no pooling, BatchNorm or dropout), so IBP and CROWN-IBP bound them.

Unpadded convolutions; at 28x28: DM-small conv 16 4x4/2 -> 13x13, conv 32 4x4/1 -> 10x10, fc 100,
classes (~0.33M weights); DM-medium conv 32 3x3/1, conv 32 4x4/2, conv 64 3x3/1, conv 64 4x4/2,
fc 512, fc 512, classes. Inputs are raw [0, 1] pixels (mean 0, std 1), as in those papers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn as nn

from robustlab.models.registry import register_model
from robustlab.models.small import _after, _size


def _chain(in_channels: int, size: tuple[int, int], model: str, convs: Sequence[tuple[int, int, int]],
           fcs: Sequence[int], num_classes: int) -> nn.Sequential:
    """conv(k, stride)-ReLU for each (channels, kernel, stride), flatten, fc-ReLU for each width, logits."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for i, (out, k, s) in enumerate(convs, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, out, k, stride=s)
        layers[f"relu{i}"] = nn.ReLU()
        c = out
    h, w = _after(size, model, *[(k, s) for _, k, s in convs])
    layers["flatten"] = nn.Flatten()
    width = c * h * w
    for j, out in enumerate(fcs, start=1):
        layers[f"fc{j}"] = nn.Linear(width, out)
        layers[f"relu_fc{j}"] = nn.ReLU()
        width = out
    layers[f"fc{len(fcs) + 1}"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


@register_model("dm_small", in_channels=1, input_size=(28, 28), mean=(0.0,), std=(1.0,), dataset="mnist")
def dm_small(num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] = (28, 28)) -> nn.Module:
    """DM-small (Gowal et al. 2018): conv 16 4x4/2, conv 32 4x4/1, fc 100, logits; ReLU."""
    size = _size(input_size, "dm_small")
    return _chain(in_channels, size, "dm_small", [(16, 4, 2), (32, 4, 1)], [100], num_classes)


@register_model("dm_medium", in_channels=1, input_size=(28, 28), mean=(0.0,), std=(1.0,), dataset="mnist")
def dm_medium(num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] = (28, 28)) -> nn.Module:
    """DM-medium (Gowal et al. 2018): conv 32 3x3/1, conv 32 4x4/2, conv 64 3x3/1, conv 64 4x4/2,
    fc 512, fc 512, logits; ReLU."""
    size = _size(input_size, "dm_medium")
    return _chain(in_channels, size, "dm_medium", [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512],
                  num_classes)
