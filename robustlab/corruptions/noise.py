"""Noise corruptions of ImageNet-C: Gaussian, shot (Poisson), impulse (salt and pepper) and speckle.

Constants: ImageNet-C (224 px), Tiny-ImageNet-C (64 px), CIFAR-10-C (32 px), from the published
generation scripts (hendrycks/robustness, ImageNet-C/create_c/make_*_c.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from robustlab.corruptions.base import Corruption
from robustlab.corruptions.imaging import normal


def _gen_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


class GaussianNoise(Corruption):
    """``x + N(0, c^2)`` per pixel and channel."""

    name = "gaussian_noise"
    suite_name = "imagenet-c"
    family = "noise"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.08, 0.12, 0.18, 0.26, 0.38),
        64: (0.04, 0.08, 0.12, 0.15, 0.18),
        32: (0.04, 0.06, 0.08, 0.09, 0.10),
    }

    def apply(self, x, generator):
        return x + self.entry(x) * normal(tuple(x.shape), generator, x.device)


class ShotNoise(Corruption):
    """``Poisson(x * c) / c``: photon noise with ``c`` photons at full intensity."""

    name = "shot_noise"
    suite_name = "imagenet-c"
    family = "noise"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: (60, 25, 12, 5, 3),
        64: (250, 100, 50, 30, 15),
        32: (500, 250, 100, 75, 50),
    }

    def apply(self, x, generator):
        c = float(self.entry(x))
        rate = (x.clamp(0, 1) * c).to(_gen_device(x, generator))
        return torch.poisson(rate, generator=generator).to(x.device) / c


class ImpulseNoise(Corruption):
    """Salt and pepper (skimage ``random_noise(mode='s&p')``): each pixel and channel, with probability
    ``c``, becomes 0 or 1 with equal odds."""

    name = "impulse_noise"
    suite_name = "imagenet-c"
    family = "noise"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.03, 0.06, 0.09, 0.17, 0.27),
        64: (0.01, 0.02, 0.05, 0.08, 0.14),
        32: (0.01, 0.02, 0.03, 0.05, 0.07),
    }

    def apply(self, x, generator):
        c = self.entry(x)
        dev = _gen_device(x, generator)
        flip = torch.rand(x.shape, generator=generator, device=dev).to(x.device) < c
        salt = torch.rand(x.shape, generator=generator, device=dev).to(x.device) < 0.5
        return torch.where(flip, salt.to(x.dtype), x)


class SpeckleNoise(Corruption):
    """``x + x * N(0, c^2)``: multiplicative noise."""

    name = "speckle_noise"
    suite_name = "imagenet-c-extra"
    family = "noise"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.15, 0.2, 0.35, 0.45, 0.6),
        64: (0.15, 0.2, 0.25, 0.3, 0.35),
        32: (0.06, 0.1, 0.12, 0.16, 0.2),
    }

    def apply(self, x, generator):
        return x + x * self.entry(x) * normal(tuple(x.shape), generator, x.device)
