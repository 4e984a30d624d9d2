"""Frost textures for the frost corruption: the six frost photographs the imagecorruptions package
ships (read from its installed folder, never downloaded), or six procedural ones when the package is
absent. Which one a frost corruption used is its ``textures`` parameter, so a stored result says it.

The procedural textures are ice-crystal networks: ridges of band-passed noise at several scales
(thin bright lines where the noise crosses its middle) over a soft plasma background, tinted blue-white,
with each texture's mean and spread set to those of one of the photographs. They are made from fixed
seeds, so every machine has the same ones.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from robustlab.corruptions.imaging import (
    gaussian_blur,
    next_power_of_2,
    plasma_fractal,
    uniform_draw,
)

FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
SOURCES = ("package", "procedural")

# RGB mean and spread of the six photographs (each procedural texture copies one); the procedural
# ones are 320 x 480 (the photographs are 315-600 x 485-900), large enough for 224 px crops.
_PROCEDURAL_SIZE = (320, 480)
_STATS = (
    ((77.7, 149.1, 165.7), (26.9, 16.5, 15.3)),
    ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
    ((200.8, 205.4, 214.5), (21.4, 22.1, 22.6)),
    ((137.6, 152.8, 165.2), (28.5, 28.5, 29.9)),
    ((112.4, 123.4, 134.8), (44.4, 43.3, 41.7)),
    ((71.4, 95.4, 104.5), (35.2, 42.7, 47.4)),
)


def package_folder() -> Path | None:
    """The frost folder of an installed imagecorruptions package (found without importing it)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    return folder if all((folder / f).is_file() for f in FILES) else None


def default_source() -> str:
    """``package`` when imagecorruptions' frost images are installed, else ``procedural``."""
    return "package" if package_folder() is not None else "procedural"


@functools.lru_cache(maxsize=2)
def frost_textures(source: str) -> tuple[torch.Tensor, ...]:
    """The six textures, float32 (3, h, w) in [0, 255] (RGB)."""
    if source == "package":
        from PIL import Image

        folder = package_folder()
        if folder is None:
            raise FileNotFoundError("imagecorruptions' frost images are not installed")
        out = []
        for f in FILES:
            with Image.open(folder / f) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                out.append(arr.view(im.height, im.width, 3).permute(2, 0, 1).float())
        return tuple(out)
    return tuple(_procedural(i, *_PROCEDURAL_SIZE, *stats) for i, stats in enumerate(_STATS))


def _procedural(index: int, height: int, width: int, mean: tuple, spread: tuple) -> torch.Tensor:
    """One texture, drawn at half resolution and enlarged (bilinear) to ``height`` x ``width``."""
    gen = torch.Generator().manual_seed(9173 + index)
    h, w = height // 2, width // 2
    ice = torch.zeros(1, 1, h, w)
    for level, (sigma, weight) in enumerate(((0.8, 1.0), (1.5, 0.8), (3.5, 0.6), (7.5, 0.4))):
        noise = torch.randn(1, 1, h, w, generator=gen)
        band = gaussian_blur(noise, sigma) - gaussian_blur(noise, 2 * sigma)
        band = band / band.std()
        ice += weight * torch.exp(-(band / (0.12 + 0.04 * level)) ** 2)
    plasma = plasma_fractal(1, next_power_of_2(max(h, w)), 2.0, uniform_draw(gen, torch.device("cpu")),
                            torch.device("cpu"))[:, :h, :w].view(1, 1, h, w).float()
    base = 0.6 * ice / ice.amax() + 0.4 * plasma
    base = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)[0]
    base = (base - base.mean()) / base.std()
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(spread).view(3, 1, 1)
    return (m + s * base).clamp(0, 255)


@functools.lru_cache(maxsize=16)
def texture_bank(source: str, scale: float, min_h: int, min_w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first five textures (the reference draws among frost1-5) resized by ``scale`` (bilinear, no
    antialiasing, as OpenCV's resize), enlarged where needed to exceed ``min_h`` x ``min_w``, padded
    into one (5, 3, Hmax, Wmax) tensor in [0, 1] on ``device``; and their (5, 2) sizes."""
    resized = []
    for tex in frost_textures(source)[:5]:
        h, w = tex.shape[-2:]
        s = max(scale, (min_h + 1) / h, (min_w + 1) / w)
        size = (max(round(h * s), min_h + 1), max(round(w * s), min_w + 1))
        if size != (h, w):
            tex = F.interpolate(tex[None], size=size, mode="bilinear", align_corners=False)[0]
        resized.append(tex.clamp(0, 255) / 255.0)
    hmax = max(t.shape[-2] for t in resized)
    wmax = max(t.shape[-1] for t in resized)
    bank = torch.zeros(len(resized), 3, hmax, wmax)
    for i, t in enumerate(resized):
        bank[i, :, : t.shape[-2], : t.shape[-1]] = t
    sizes = torch.tensor([t.shape[-2:] for t in resized])
    return bank.to(device), sizes.to(device)


def frost_crops(bank: torch.Tensor, sizes: torch.Tensor, h: int, w: int, u: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) crops: texture ``floor(5 u0)``, top-left corner ``floor(u1 (th - h))``,
    ``floor(u2 (tw - w))``; ``u`` is (N, 3) uniform numbers."""
    n = u.shape[0]
    t, _, hmax, wmax = bank.shape
    idx = (u[:, 0] * t).floor().long().clamp(max=t - 1)
    th, tw = sizes[idx, 0], sizes[idx, 1]
    y0 = (u[:, 1] * (th - h).to(u.dtype)).floor().long()
    x0 = (u[:, 2] * (tw - w).to(u.dtype)).floor().long()
    dev = bank.device
    rows = y0.view(n, 1) + torch.arange(h, device=dev).view(1, h)
    cols = x0.view(n, 1) + torch.arange(w, device=dev).view(1, w)
    ch = torch.arange(3, device=dev).view(1, 3, 1, 1)
    flat = ((idx.view(n, 1, 1, 1) * 3 + ch) * hmax + rows.view(n, 1, h, 1)) * wmax + cols.view(n, 1, 1, w)
    return bank.reshape(-1)[flat]
