"""JPEG compression as a defense (Dziugaite et al. 2016; Das et al. 2017; Guo et al. 2018), and the
differentiable approximation of JPEG that its adaptive attack differentiates (Shin & Song 2017).

The defense's prediction uses a real JPEG codec (libjpeg through torchvision, quality ``quality``,
4:2:0 chroma subsampling for colour images as libjpeg does by default). The codec's rounding has zero
gradient almost everywhere, so attacks see it by BPDA with :func:`differentiable_jpeg` in the backward
pass: the same colour transform, chroma subsampling, 8x8 DCT and quantization tables, with rounding
replaced by ``round(v) + (v - round(v))**3``, whose derivative is not zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError

# The example quantization tables of the JPEG standard (ITU T.81, Annex K), row-major.
_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def quantization_table(base: tuple[int, ...], quality: int) -> torch.Tensor:
    """The (8, 8) table libjpeg uses at ``quality`` (1-100): the base table scaled by 5000/q below 50
    and by 200 - 2q from 50, rounded, clipped to 1..255."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float32).view(8, 8)
    return ((table * scale + 50) // 100).clamp(1, 255)


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64).view(8, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, 8)
    m = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    m[0] = math.sqrt(1 / 8)
    return m.float()


_DCT = _dct_matrix()


def _soft_round(v: torch.Tensor) -> torch.Tensor:
    r = torch.round(v)
    return r + (v - r) ** 3


def _blocks_quantized(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A plane (N, H, W) on 0..255 through 8x8 DCT, soft quantization by ``table`` and back."""
    n, h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    if ph or pw:
        plane = F.pad(plane.unsqueeze(1), (0, pw, 0, ph), mode="replicate").squeeze(1)
    hh, ww = plane.shape[1:]
    blocks = (plane - 128).view(n, hh // 8, 8, ww // 8, 8).permute(0, 1, 3, 2, 4)
    d = _DCT.to(plane)
    table = table.to(plane)
    coeffs = d @ blocks @ d.T
    coeffs = _soft_round(coeffs / table) * table
    out = (d.T @ coeffs @ d + 128).permute(0, 1, 3, 2, 4).reshape(n, hh, ww)
    return out[:, :h, :w]


def differentiable_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A differentiable approximation of JPEG at ``quality`` on a batch (N, C, H, W) in [0, 1], C = 1
    or 3 (see the module docstring)."""
    luma, chroma = quantization_table(_LUMA, quality), quantization_table(_CHROMA, quality)
    v = x * 255
    if x.shape[1] == 1:
        return (_blocks_quantized(v[:, 0], luma).unsqueeze(1) / 255).clamp(0, 1)
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    h, w = y.shape[1:]
    y = _blocks_quantized(y, luma)
    planes = []
    for c in (cb, cr):  # 4:2:0: chroma at half resolution, then back up
        small = F.avg_pool2d(F.pad(c.unsqueeze(1), (0, w % 2, 0, h % 2), mode="replicate"), 2).squeeze(1)
        small = _blocks_quantized(small, chroma)
        planes.append(F.interpolate(small.unsqueeze(1), scale_factor=2, mode="bilinear",
                                    align_corners=False).squeeze(1)[:, :h, :w])
    cb, cr = planes[0] - 128, planes[1] - 128
    rgb = torch.stack((y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), dim=1)
    return (rgb / 255).clamp(0, 1)


def real_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG encode and decode of each image of a batch (N, C, H, W) in [0, 1] with libjpeg, C = 1 or 3;
    the result is on ``x``'s device and dtype."""
    if x.shape[1] not in (1, 3):
        raise RobustlabError(f"defense 'jpeg' takes grayscale or RGB images, got {x.shape[1]} channels")
    images = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    decoded = decode_jpeg(encode_jpeg(list(images), quality=quality))
    return (torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255).view_as(x)


@register_defense
class JPEG(Defense):
    """JPEG compression at ``quality`` (1-100) in front of the model. Not differentiable: attacks go
    through it by BPDA with :func:`differentiable_jpeg` as the surrogate."""

    name = "jpeg"
    defaults = {"quality": 75}
    differentiable = False

    def validate(self) -> None:
        if not 1 <= self.params["quality"] <= 100:
            raise RobustlabError(f"defense 'jpeg': quality must be in 1..100, got {self.params['quality']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return real_jpeg(x, self.params["quality"])

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return differentiable_jpeg(x, self.params["quality"])
