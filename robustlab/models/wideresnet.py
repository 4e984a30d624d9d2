"""WideResNet (Zagoruyko & Komodakis 2016) in the CIFAR form used by Madry et al. and TRADES.

WRN-d-k: depth d = 6n + 4 (n basic blocks per stage), widen factor k; stages of 16k, 32k, 64k
channels at strides 1, 2, 2 after a 16-channel stem; final BN-ReLU, global average pool, linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models.registry import register_model
from robustlab.models.small import CIFAR10_MEAN, CIFAR10_STD


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3; 1x1 conv shortcut when the
    shape changes (applied to the pre-activated input, as in the reference code)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs (any size works: the pool is global)."""

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise RobustlabError(f"wideresnet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise RobustlabError(f"wideresnet: widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise RobustlabError(f"wideresnet: dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(n, widths[0], widths[1], 1, dropout)
        self.block2 = self._stage(n, widths[1], widths[2], 2, dropout)
        self.block3 = self._stage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(n: int, in_planes: int, out_planes: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 8) at 32x32 input
        return self.fc(out)


_CIFAR = dict(in_channels=3, input_size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, dataset="cifar10")


@register_model("wideresnet", **_CIFAR)
def wideresnet(
    num_classes: int = 10, in_channels: int = 3, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """Generic WRN-depth-widen_factor (e.g. depth=16, widen_factor=1 for a cheap test model)."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)


@register_model("wrn_28_10", **_CIFAR)
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-28-10 (about 36.5M parameters)."""
    return WideResNet(28, 10, num_classes, in_channels, dropout)


@register_model("wrn_34_10", **_CIFAR)
def wrn_34_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-34-10 of Madry et al. / TRADES (about 46.2M parameters)."""
    return WideResNet(34, 10, num_classes, in_channels, dropout)
