"""Weather corruptions of ImageNet-C: snow, frost, fog and spatter.

Constants: ImageNet-C (224 px), Tiny-ImageNet-C (64 px), CIFAR-10-C (32 px), from the published
generation scripts (hendrycks/robustness, ImageNet-C/create_c/make_*_c.py). Snow's streaks use the
kernel motion blur of :mod:`robustlab.corruptions.blur` (the reference called ImageMagick). Each
corruption draws its random numbers, then calls a ``*_core`` function that is deterministic in them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustlab.corruptions import textures
from robustlab.corruptions.base import Corruption
from robustlab.corruptions.imaging import (
    box3,
    canny,
    clipped_zoom,
    equalize_hist,
    filter2d,
    gaussian_blur,
    motion_blur,
    next_power_of_2,
    normal,
    plasma_fractal,
    to_gray,
    truncated_distance,
    uniform_draw,
)
from robustlab.errors import RobustlabError


def _color(rgb: tuple[int, int, int], channels: int, device: torch.device) -> torch.Tensor:
    """A colour (1, C, 1, 1) in [0, 1]; its luma (weights 0.2989, 0.587, 0.114) for grey images."""
    c = torch.tensor(rgb, dtype=torch.float32, device=device) / 255.0
    if channels == 1:
        c = (c * torch.tensor((0.2989, 0.5870, 0.1140), device=device)).sum().view(1)
    return c.view(1, -1, 1, 1)


class Snow(Corruption):
    """A snow layer (normal noise ``N(c0, c1)``, zoomed by ``c2``, below ``c3`` set to 0, streaked by
    a motion blur of radius ``c4``, sigma ``c5`` at an angle in [-135, -45)) added twice (once turned
    by 180 degrees) to the image brightened towards grey: ``c6 x + (1 - c6) max(x, 1.5 gray + 0.5)``."""

    name = "snow"
    suite_name = "imagenet-c"
    family = "weather"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
              (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
        64: ((0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)),
        32: ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    }

    def apply(self, x, generator):
        n, _, h, w = x.shape
        noise = normal((n, 1, h, w), generator, x.device)
        angles = uniform_draw(generator, x.device)((n,)) * 90.0 - 135.0
        return snow_core(x, self.entry(x), noise, angles)


def snow_core(x: torch.Tensor, c: tuple, noise: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Snow with given standard normal ``noise`` (N, 1, H, W) and streak ``angles`` (N,) in degrees."""
    layer = clipped_zoom(noise.to(x.dtype) * c[1] + c[0], c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp(0, 1)
    layer = motion_blur(layer, c[4], c[5], angles)
    layer = torch.round(layer * 255) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, to_gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


class Frost(Corruption):
    """``c0 x + c1 frost``: a random crop of one of five frost textures (resized by the table's
    scale). ``textures``: ``package`` (imagecorruptions' photographs), ``procedural`` (generated), or
    ``auto`` (the package's when installed; the parameter then records which)."""

    name = "frost"
    suite_name = "imagenet-c"
    family = "weather"
    randomized = True
    defaults: ClassVar[dict[str, Any]] = {"severity": 1, "table": 0, "textures": "auto"}
    choices: ClassVar[dict[str, tuple]] = {"textures": ("auto", *textures.SOURCES)}
    tables: ClassVar[dict[int, tuple]] = {
        224: ((1, 0.4, 1.0), (0.8, 0.6, 1.0), (0.7, 0.7, 1.0), (0.65, 0.7, 1.0), (0.6, 0.75, 1.0)),
        64: ((1, 0.3, 0.3), (0.9, 0.4, 0.3), (0.8, 0.45, 0.3), (0.75, 0.5, 0.3), (0.7, 0.55, 0.3)),
        32: ((1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)),
    }

    def validate(self) -> None:
        super().validate()
        if self.params["textures"] == "auto":
            self.params["textures"] = textures.default_source()
        elif self.params["textures"] == "package" and textures.package_folder() is None:
            raise RobustlabError(f"{self.owner}: textures=package needs the imagecorruptions package installed; "
                                 "use textures=procedural")

    def apply(self, x, generator):
        n, _, h, w = x.shape
        c0, c1, scale = self.entry(x)
        bank, sizes = textures.texture_bank(self.params["textures"], scale, h, w, str(x.device))
        crops = textures.frost_crops(bank, sizes, h, w, uniform_draw(generator, x.device)((n, 3)))
        return frost_core(x, c0, c1, crops)


def frost_core(x: torch.Tensor, c0: float, c1: float, crops: torch.Tensor) -> torch.Tensor:
    """Frost with given texture ``crops`` (N, 3, H, W) in [0, 1]."""
    return c0 * x + c1 * (to_gray(crops) if x.shape[1] == 1 else crops)


class Fog(Corruption):
    """``(x + c0 plasma) max(x) / (max(x) + c0)`` with a diamond-square plasma of decay ``c1``."""

    name = "fog"
    suite_name = "imagenet-c"
    family = "weather"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
        64: ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
        32: ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    }

    def apply(self, x, generator):
        n, _, h, w = x.shape
        c = self.entry(x)
        plasma = plasma_fractal(n, next_power_of_2(max(h, w)), c[1], uniform_draw(generator, x.device), x.device)
        return fog_core(x, c, plasma)


def fog_core(x: torch.Tensor, c: tuple, plasma: torch.Tensor) -> torch.Tensor:
    """Fog with a given ``plasma`` (N, M, M) in [0, 1], M >= the image's sides."""
    h, w = x.shape[-2:]
    top = x.amax((1, 2, 3), keepdim=True)
    x = x + c[0] * plasma[:, None, :h, :w].to(x.dtype)
    return x * top / (top + c[0])


class Spatter(Corruption):
    """Liquid drops from thresholded smoothed noise ``N(c0, c1)`` (sigma ``c2``, threshold ``c3``):
    water (``c5`` = 0: pale turquoise, shaded by the distance to the drops' Canny edges, strength
    ``c4``) or mud (``c5`` = 1: brown blobs smoothed by sigma ``c4``)."""

    name = "spatter"
    suite_name = "imagenet-c-extra"
    family = "weather"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
              (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)),
        64: ((0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0), (0.65, 0.3, 1, 0.69, 0.6, 0),
             (0.65, 0.1, 0.7, 0.68, 0.6, 1), (0.65, 0.1, 0.5, 0.67, 0.6, 1)),
        32: ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
             (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    }

    def apply(self, x, generator):
        n, _, h, w = x.shape
        return spatter_core(x, self.entry(x), normal((n, 1, h, w), generator, x.device))


_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])


def spatter_core(x: torch.Tensor, c: tuple, noise: torch.Tensor) -> torch.Tensor:
    """Spatter with given standard normal ``noise`` (N, 1, H, W)."""
    liquid = gaussian_blur(noise.to(x.dtype) * c[1] + c[0], c[2])
    liquid = torch.where(liquid < c[3], torch.zeros_like(liquid), liquid)
    if c[5] == 0:
        drops = torch.floor((liquid * 255).clamp(0, 255))
        edges = canny(drops[:, 0], 50, 150)
        dist = truncated_distance(edges, 20).unsqueeze(1)
        dist = torch.floor(box3(dist))
        dist = equalize_hist(dist[:, 0]).unsqueeze(1)
        dist = torch.round(filter2d(dist, _EMBOSS)).clamp(0, 255)
        dist = box3(dist)
        m = drops * dist
        m = m / m.amax((2, 3), keepdim=True).clamp(min=1e-12) * c[4]
        return x + m * _color((175, 238, 238), x.shape[1], x.device)
    m = gaussian_blur((liquid > c[3]).to(x.dtype), c[4])
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    return x * (1 - m) + m * _color((63, 42, 20), x.shape[1], x.device)


__all__ = ["Fog", "Frost", "Snow", "Spatter"]
