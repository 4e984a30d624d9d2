"""Blur corruptions of ImageNet-C: defocus, glass, motion, zoom and Gaussian blur.

Constants: ImageNet-C (224 px), Tiny-ImageNet-C (64 px), CIFAR-10-C (32 px), from the published
generation scripts (hendrycks/robustness, ImageNet-C/create_c/make_*_c.py). Motion blur uses the
kernel form of ImageMagick's motion blur that the imagecorruptions package introduced (the reference
called ImageMagick through Wand). Glass blur performs the reference's sequential sweep of local pixel
moves exactly, but many at once: see :func:`glass_swap`.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch

from robustlab.corruptions.base import Corruption
from robustlab.corruptions.imaging import (
    Draw,
    disk_kernel,
    filter2d,
    gaussian_blur,
    motion_blur,
    quantize_floor,
    uniform_draw,
    zoom_sum,
)


class DefocusBlur(Corruption):
    """Correlation with an anti-aliased disk of radius ``c[0]`` (alias blur ``c[1]``), border reflect101."""

    name = "defocus_blur"
    suite_name = "imagenet-c"
    family = "blur"
    tables: ClassVar[dict[int, tuple]] = {
        224: ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        64: ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
        32: ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    }

    def apply(self, x, generator):
        radius, alias = self.entry(x)
        return filter2d(x, _disk(radius, alias))


@functools.lru_cache(maxsize=64)
def _disk(radius: float, alias: float) -> torch.Tensor:
    return disk_kernel(radius, alias)


@functools.lru_cache(maxsize=32)
def _wavefronts(h: int, w: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's swap positions (rows ``h - d`` down to ``d + 1``, in each row columns ``w - d``
    down to ``d + 1``) grouped into waves that can run at once: wave ``t`` holds the ``k``-th row and
    ``j``-th column of the sweep with ``2 d k + j = t``. Two steps (each reads one pixel and writes
    another within ``d`` of it) touch a common pixel only when both their rows and columns are less
    than ``2 d`` apart, so steps in one wave never interact and every earlier step a step could
    interact with is in an earlier wave: running the waves in order gives exactly the sequential
    result. Returns (waves, K) flat pixel indices and sweep indices, padded
    with ``h * w`` and ``-1``."""
    nh, nw = h - 2 * d, w - 2 * d
    k = torch.arange(nh).view(-1, 1)
    j = torch.arange(nw).view(1, -1)
    wave = (2 * d * k + j).flatten()
    sweep = (k * nw + j).flatten()
    pixel = ((h - d - k) * w + (w - d - j)).flatten()
    order = torch.argsort(wave, stable=True)
    counts = torch.bincount(wave)
    width = int(counts.max())
    pos = torch.full((len(counts), width), h * w, dtype=torch.long)
    seq = torch.full((len(counts), width), -1, dtype=torch.long)
    slot = torch.arange(len(wave)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pos[wave[order], slot] = pixel[order]
    seq[wave[order], slot] = sweep[order]
    return pos, seq


def glass_swap(x: torch.Tensor, max_delta: int, offsets: list[torch.Tensor]) -> torch.Tensor:
    """ImageNet-C's local pixel shuffle, one sweep per entry of ``offsets``: the sweep visits pixels
    from the bottom-right to the top-left and gives each the current value of the pixel ``(dy, dx)``
    away, ``offsets`` being (N, S, 2) integers ``(dx, dy)`` in ``[-max_delta, max_delta)``, one per
    visited pixel in sweep order (S = (H - 2 max_delta) * (W - 2 max_delta)). (The reference writes a
    swap, ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``, but on NumPy views of an (H, W, 3) image that
    copies: the second assignment writes back the value the first one put there. Its images, and
    imagecorruptions', were made that way; so are these.) The copies run wave by wave
    (:func:`_wavefronts`) on an index map, then one gather moves the pixels."""
    n, c, h, w = x.shape
    d = max_delta
    if h - 2 * d <= 0 or w - 2 * d <= 0 or not offsets:
        return x
    pos, seq = (t.to(x.device) for t in _wavefronts(h, w, d))
    perm = torch.arange(h * w + 1, device=x.device).repeat(n, 1)
    for off in offsets:
        off = off.to(x.device).long()
        flat = off[..., 1] * w + off[..., 0]
        flat = torch.cat([flat, torch.zeros(n, 1, dtype=torch.long, device=x.device)], 1)
        sources = pos.unsqueeze(0) + flat[:, seq]  # (N, waves, K): the pixel each step reads
        targets = pos.unsqueeze(0).expand(n, -1, -1)
        for t in range(pos.shape[0]):
            perm.scatter_(1, targets[:, t], perm.gather(1, sources[:, t]))
    index = perm[:, : h * w].unsqueeze(1).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def glass_offsets(n: int, h: int, w: int, max_delta: int, iterations: int, draw: Draw) -> list[torch.Tensor]:
    """Random (dx, dy) per visited pixel and sweep, uniform on ``[-max_delta, max_delta)``."""
    s = max(h - 2 * max_delta, 0) * max(w - 2 * max_delta, 0)
    return [(draw((n, s, 2)) * (2 * max_delta)).floor().long() - max_delta for _ in range(iterations)]


class GlassBlur(Corruption):
    """Gaussian blur (sigma ``c[0]``), truncation to 8 bits, ``c[2]`` sweeps of local pixel moves up to
    ``c[1]`` pixels away (:func:`glass_swap`), Gaussian blur again."""

    name = "glass_blur"
    suite_name = "imagenet-c"
    family = "blur"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        64: ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
        32: ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    }

    def apply(self, x, generator):
        sigma, delta, iterations = self.entry(x)
        n, _, h, w = x.shape
        offsets = glass_offsets(n, h, w, delta, iterations, uniform_draw(generator, x.device))
        return glass_core(x, sigma, delta, offsets)


def glass_core(x: torch.Tensor, sigma: float, max_delta: int, offsets: list[torch.Tensor]) -> torch.Tensor:
    """Glass blur with given swap offsets (see :func:`glass_swap`)."""
    x = quantize_floor(gaussian_blur(x, sigma))
    return gaussian_blur(glass_swap(x, max_delta, offsets), sigma)


class MotionBlur(Corruption):
    """Motion blur of radius ``c[0]`` and sigma ``c[1]`` along an angle uniform in [-45, 45) degrees."""

    name = "motion_blur"
    suite_name = "imagenet-c"
    family = "blur"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        224: ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        64: ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
        32: ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    }

    def apply(self, x, generator):
        radius, sigma = self.entry(x)
        angles = uniform_draw(generator, x.device)((x.shape[0],)) * 90.0 - 45.0
        return motion_blur(x, radius, sigma, angles)


def _arange(stop: float, step: float) -> tuple[float, ...]:
    return tuple(float(z) for z in np.arange(1, stop, step))


class ZoomBlur(Corruption):
    """The mean of the image and its centre zooms by each factor of ``c``."""

    name = "zoom_blur"
    suite_name = "imagenet-c"
    family = "blur"
    _small = (_arange(1.06, 0.01), _arange(1.11, 0.01), _arange(1.16, 0.01), _arange(1.21, 0.01), _arange(1.26, 0.01))
    tables: ClassVar[dict[int, tuple]] = {
        224: (_arange(1.11, 0.01), _arange(1.16, 0.01), _arange(1.21, 0.02), _arange(1.26, 0.02), _arange(1.31, 0.03)),
        64: _small,
        32: _small,
    }

    def apply(self, x, generator):
        factors = self.entry(x)
        return (x + zoom_sum(x, factors)) / (len(factors) + 1)


class GaussianBlur(Corruption):
    """Gaussian blur of sigma ``c`` (skimage ``gaussian``: truncated at 4 sigma, border ``nearest``)."""

    name = "gaussian_blur"
    suite_name = "imagenet-c-extra"
    family = "blur"
    tables: ClassVar[dict[int, tuple]] = {
        224: (1, 2, 3, 4, 6),
        64: (0.5, 0.75, 1, 1.25, 1.5),
        32: (0.4, 0.6, 0.7, 0.8, 1),
    }

    def apply(self, x, generator):
        return gaussian_blur(x, float(self.entry(x)))
