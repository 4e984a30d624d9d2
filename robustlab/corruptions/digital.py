"""Digital corruptions of ImageNet-C: brightness, contrast, elastic transform, pixelate, JPEG
compression and saturate.

Constants: ImageNet-C (224 px), Tiny-ImageNet-C (64 px), CIFAR-10-C (32 px), from the published
generation scripts (hendrycks/robustness, ImageNet-C/create_c/make_*_c.py). JPEG is a real encode and
decode (libjpeg through torchvision, on the CPU, the whole batch in one call); it is not
differentiable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from robustlab.corruptions.base import Corruption
from robustlab.corruptions.imaging import (
    add_value,
    box_resize,
    gaussian_blur,
    sample_bilinear,
    scale_saturation,
    uniform_draw,
)


class Brightness(Corruption):
    """Value (HSV) raised by ``c``; grey images: ``x + c``."""

    name = "brightness"
    suite_name = "imagenet-c"
    family = "digital"
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.1, 0.2, 0.3, 0.4, 0.5),
        64: (0.1, 0.2, 0.3, 0.4, 0.5),
        32: (0.05, 0.1, 0.15, 0.2, 0.3),
    }

    def apply(self, x, generator):
        c = self.entry(x)
        if x.shape[1] == 1:
            return x + c
        return add_value(x.clamp(0, 1), c)


class Contrast(Corruption):
    """``(x - mean) c + mean`` with each image's mean per channel."""

    name = "contrast"
    suite_name = "imagenet-c"
    family = "digital"
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.4, 0.3, 0.2, 0.1, 0.05),
        64: (0.4, 0.3, 0.2, 0.1, 0.05),
        32: (0.75, 0.5, 0.4, 0.3, 0.15),
    }

    def apply(self, x, generator):
        means = x.mean((2, 3), keepdim=True)
        return (x - means) * self.entry(x) + means


def _elastic(scale: float, rows: tuple) -> tuple:
    return tuple(tuple(scale * v for v in row) for row in rows)


class ElasticTransform(Corruption):
    """A random affine warp (three control points moved by up to ``c2`` pixels, border reflect101),
    then a displacement field of uniform noise smoothed by a Gaussian of sigma ``c1`` (truncated at 3
    sigma) and scaled by ``c0`` (bilinear, border symmetric)."""

    name = "elastic_transform"
    suite_name = "imagenet-c"
    family = "digital"
    randomized = True
    tables: ClassVar[dict[int, tuple]] = {
        # 244 (not 224) is what the published ImageNet-C script uses.
        224: _elastic(244, ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))),
        64: _elastic(64, ((0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06), (0.1, 0.03, 0.03), (0.16, 0.03, 0.02))),
        32: _elastic(32, ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
    }

    def apply(self, x, generator):
        n, _, h, w = x.shape
        draw = uniform_draw(generator, x.device)
        moves = draw((n, 3, 2)) * 2 - 1
        field = draw((n, 2, h, w)) * 2 - 1
        return elastic_core(x, self.entry(x), moves, field)


def elastic_core(x: torch.Tensor, c: tuple, moves: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Elastic transform with given control point ``moves`` (N, 3, 2) and displacement noise ``field``
    (N, 2, H, W) (rows: dx, dy), both uniform in [-1, 1)."""
    n, _, h, w = x.shape
    cy, cx, sq = h // 2, w // 2, min(h, w) // 3
    src = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64,
                       device=x.device).expand(n, 3, 2)
    dst = src + c[2] * moves.to(torch.float64)
    ones = torch.ones(n, 3, 1, dtype=torch.float64, device=x.device)
    # the affine map taking the moved points back to the original ones: dst -> src
    inverse = torch.linalg.solve(torch.cat([dst, ones], 2), src)  # (N, 3, 2): [x, y, 1] @ inverse
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=x.device),
                            torch.arange(w, dtype=torch.float64, device=x.device), indexing="ij")
    grid = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, h * w, 3)
    mapped = torch.matmul(grid, inverse).reshape(n, h, w, 2).float()
    x = sample_bilinear(x, mapped[..., 1], mapped[..., 0], "reflect101")
    disp = (gaussian_blur(field.to(torch.float64), c[1], mode="symmetric", truncate=3.0) * c[0]).float()
    return sample_bilinear(x, gy.float() + disp[:, 1], gx.float() + disp[:, 0], "symmetric")


class Pixelate(Corruption):
    """Box-filter downscaling to ``int(side * c)`` pixels, then box-filter upscaling back (Pillow BOX)."""

    name = "pixelate"
    suite_name = "imagenet-c"
    family = "digital"
    tables: ClassVar[dict[int, tuple]] = {
        224: (0.6, 0.5, 0.4, 0.3, 0.25),
        64: (0.9, 0.8, 0.7, 0.6, 0.5),
        32: (0.95, 0.9, 0.85, 0.75, 0.65),
    }

    def apply(self, x, generator):
        c = self.entry(x)
        h, w = x.shape[-2:]
        small = box_resize(x, (max(int(h * c), 1), max(int(w * c), 1)))
        return box_resize(small, (h, w))


class JpegCompression(Corruption):
    """A JPEG encode at quality ``c`` and decode (libjpeg, 4:2:0 chroma for RGB), of the image rounded
    to 8 bits."""

    name = "jpeg_compression"
    suite_name = "imagenet-c"
    family = "digital"
    tables: ClassVar[dict[int, tuple]] = {
        224: (25, 18, 15, 10, 7),
        64: (65, 58, 50, 40, 25),
        32: (80, 65, 58, 50, 40),
    }

    def apply(self, x, generator):
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        decoded = decode_jpeg(encode_jpeg(list(images), quality=int(self.entry(x))))
        return torch.stack(decoded).to(x.device, torch.float32) / 255.0


class Saturate(Corruption):
    """Saturation (HSV) ``s c0 + c1``; grey images are unchanged (their hue is undefined: the reference
    code path returns them as they are)."""

    name = "saturate"
    suite_name = "imagenet-c-extra"
    family = "digital"
    tables: ClassVar[dict[int, tuple]] = {
        224: ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        64: ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
        32: ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    }

    def apply(self, x, generator):
        if x.shape[1] == 1:
            return x.clone()
        gain, offset = self.entry(x)
        return scale_saturation(x.clamp(0, 1), gain, offset)
