"""Small architectures: digits (8x8), MNIST (28x28) and a fast CIFAR-10 CNN.

Every factory takes ``num_classes`` and ``in_channels``; networks with a flatten layer sized by the
input also take ``input_size`` (H, W) in pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn as nn

from robustlab.errors import RobustlabError
from robustlab.models.registry import register_model

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3761,)  # sklearn digits / 16
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def _size(input_size: Sequence[int], model: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise RobustlabError(f"{model}: input_size must be (height, width), got {input_size!r}") from None
    return h, w


def _after(size: tuple[int, int], model: str, *layers: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after unpadded layers given as (kernel, stride); error if it vanishes."""
    h, w = size
    for k, s in layers:
        h, w = (h - k) // s + 1, (w - k) // s + 1
        if h < 1 or w < 1:
            raise RobustlabError(f"{model}: input_size {size} is too small for this architecture")
    return h, w


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


@register_model("digits_mlp", in_channels=1, input_size=(8, 8), mean=DIGITS_MEAN, std=DIGITS_STD, dataset="digits")
def digits_mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (8, 8),
    hidden: Sequence[int] = (256, 128),
) -> nn.Module:
    """MLP for scikit-learn digits (8x8x1): flatten, two hidden ReLU layers (sizes ``hidden``), logits."""
    h, w = _size(input_size, "digits_mlp")
    widths = [in_channels * h * w, *[int(v) for v in hidden]]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


@register_model("digits_cnn", in_channels=1, input_size=(8, 8), mean=DIGITS_MEAN, std=DIGITS_STD, dataset="digits")
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Small CNN for 8x8 digits (~25k parameters): conv 16, max-pool 2, conv 32, pooled to 4x4,
    fc 64, logits; 3x3 padded convs, ReLU. Works for any input of at least 2x2."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 16, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.AdaptiveMaxPool2d((4, 4)),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, num_classes),
        )
    )


class SmallCNN(nn.Module):
    """The MNIST SmallCNN of the TRADES and MART papers.

    conv 32, conv 32 (3x3, unpadded), max-pool 2, conv 64, conv 64, max-pool 2, fc 200, fc 200, fc
    classes; ReLU throughout; dropout (0.5 in the reference code) after the first fc layer.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] = (28, 28), dropout: float = 0.5
    ) -> None:
        super().__init__()
        size = _size(input_size, "smallcnn")
        h, w = _after(size, "smallcnn", (3, 1), (3, 1), (2, 2), (3, 1), (3, 1), (2, 2))
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, 3),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 32, 3),
                relu2=nn.ReLU(),
                pool1=nn.MaxPool2d(2, 2),
                conv3=nn.Conv2d(32, 64, 3),
                relu3=nn.ReLU(),
                conv4=nn.Conv2d(64, 64, 3),
                relu4=nn.ReLU(),
                pool2=nn.MaxPool2d(2, 2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(64 * h * w, 200),
                relu1=nn.ReLU(),
                drop=nn.Dropout(dropout),
                fc2=nn.Linear(200, 200),
                relu2=nn.ReLU(),
                fc3=nn.Linear(200, num_classes),
            )
        )
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x).flatten(1))


@register_model("smallcnn", in_channels=1, input_size=(28, 28), mean=(0.0,), std=(1.0,), dataset="mnist")
def smallcnn(
    num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] = (28, 28), dropout: float = 0.5
) -> nn.Module:
    """TRADES/MART SmallCNN for 28x28 MNIST; ``dropout`` after fc1 (0.5 as in the original)."""
    if not 0.0 <= dropout < 1.0:
        raise RobustlabError(f"smallcnn: dropout must be in [0, 1), got {dropout}")
    return SmallCNN(num_classes, in_channels, input_size, dropout)


@register_model("lenet", in_channels=1, input_size=(28, 28), mean=MNIST_MEAN, std=MNIST_STD, dataset="mnist")
def lenet(num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] = (28, 28)) -> nn.Module:
    """LeNet-5 style for 28x28: conv 6 (5x5, pad 2), max-pool, conv 16 (5x5), max-pool, fc 120, 84, classes; ReLU."""
    size = _size(input_size, "lenet")
    h, w = _after((size[0] + 4, size[1] + 4), "lenet", (5, 1), (2, 2), (5, 1), (2, 2))
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 6, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, 2),
            conv2=nn.Conv2d(6, 16, 5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, 2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(16 * h * w, 120),
            relu3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu4=nn.ReLU(),
            fc3=nn.Linear(84, num_classes),
        )
    )


@register_model("cifar_cnn", in_channels=3, input_size=(32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD, dataset="cifar10")
def cifar_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    """Fast CIFAR-10 CNN for CPU benchmarks (~0.8M parameters at ``width`` 32).

    Three stages of two conv3x3-BN-ReLU layers (width, 2x, 4x channels), each followed by max-pool 2;
    pooled to 4x4 (identity at 32x32 input), fc 256, logits.
    """
    c1, c2, c3 = width, 2 * width, 4 * width
    return nn.Sequential(
        OrderedDict(
            block1=nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1), nn.MaxPool2d(2)),
            block2=nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2), nn.MaxPool2d(2)),
            block3=nn.Sequential(_conv_bn_relu(c2, c3), _conv_bn_relu(c3, c3), nn.MaxPool2d(2)),
            pool=nn.AdaptiveAvgPool2d((4, 4)),
            flatten=nn.Flatten(),
            fc1=nn.Linear(c3 * 16, 256),
            relu=nn.ReLU(),
            fc2=nn.Linear(256, num_classes),
        )
    )
