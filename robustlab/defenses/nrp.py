"""The Neural Representation Purifier as a defense (Naseer et al. 2020): ``--defense
nrp:purifier=FILE`` runs every image through a trained purifier (``robustlab purify train``) in
front of the model.

The purifier is a network, so the defense is an ``nn.Module`` (it moves with the model) and
``iterative``: the adaptive attacker differentiates through it (white-box). ``attack=bpda`` makes the
attacker's view BPDA with the identity instead (straight-through: the purifier forward, the identity
backward), the attack of the paper's gray-box setting.

``dynamic=true`` is the paper's defense against white-box attackers: Gaussian noise of standard
deviation ``sigma`` is added before purification, kept within ``clip`` (Linf) of the input and in
[0, 1]; the defense is then randomized: predictions vote over ``draws`` draws and attacks average
gradients over as many (EOT). ``clip`` defaults to the SSP budget the purifier was trained at (its
card), the paper's 16/255 when the card does not say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


@register_defense
class NRP(Defense, nn.Module):
    """NRP: a trained purifier (robustlab purify train) in front of the model; dynamic=true adds noise first.

    purifier: the purifier file (``X.safetensors`` with its card); dynamic: add clipped Gaussian
    noise first (randomized); sigma, clip: the noise's standard deviation and Linf bound (clip None:
    the purifier's training epsilon); draws: votes and EOT draws when dynamic; attack: ``through``
    (gradients through the purifier) or ``bpda`` (identity backward).
    """

    name = "nrp"
    defaults: ClassVar[dict[str, Any]] = {"purifier": "", "dynamic": False, "sigma": 0.05, "clip": None, "draws": 8, "attack": "through"}
    choices: ClassVar[dict[str, tuple]] = {"attack": ("through", "bpda")}
    iterative = True

    def __init__(self, **params: Any) -> None:
        nn.Module.__init__(self)
        Defense.__init__(self, **params)
        from robustlab.models.purifier import load_purifier

        self.purifier, self.card = load_purifier(self.params["purifier"])
        self.channels = int(self.card.in_channels or self.purifier.channels)
        if self.params["clip"] is None:
            ssp = (self.card.training or {}).get("ssp") or {}
            self.params["clip"] = float(ssp.get("eps", 16 / 255)) if ssp.get("norm", "linf") == "linf" else 16 / 255
        # Instance flags (the class defaults describe the plain, deterministic, differentiated form).
        self.randomized = bool(self.params["dynamic"])
        self.differentiable = self.params["attack"] == "through"

    def validate(self) -> None:
        p = self.params
        if not isinstance(p["purifier"], str) or not p["purifier"]:
            raise RobustlabError("defense 'nrp' needs purifier=FILE (a purifier written by `robustlab purify train`)")
        if not p["sigma"] >= 0:
            raise RobustlabError(f"defense 'nrp': sigma must be >= 0, got {p['sigma']}")
        if p["clip"] is not None and not (isinstance(p["clip"], float) and p["clip"] > 0):
            raise RobustlabError(f"defense 'nrp': clip must be a number > 0, got {p['clip']!r}")
        if p["draws"] < 1:
            raise RobustlabError(f"defense 'nrp': draws must be >= 1, got {p['draws']}")

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            got = x.shape[1] if x.dim() == 4 else f"shape {tuple(x.shape)}"
            raise RobustlabError(
                f"defense 'nrp': the purifier {self.params['purifier']} was trained on images with {self.channels} "
                f"channel(s), these have {got}; train one for this data (robustlab purify train)")

    def noise(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The dynamic variant's input: ``x`` plus N(0, sigma^2) noise, clipped to ``clip`` of ``x`` and to [0, 1]."""
        clip = self.params["clip"]
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * self.params["sigma"]
        return (x + noise.clamp(-clip, clip)).clamp(0.0, 1.0)

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(x)
        if self.params["dynamic"]:
            x = self.noise(x, generator)
        return self.purifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items())


def purify_folder(purifier: nn.Module, in_dir: str | Path, out_dir: str | Path, size: int | None = None,
                  batch_size: int = 64, progress: bool | None = None) -> list[Path]:
    """Purify every image below ``in_dir`` (sub-folders included) and write each result to ``out_dir``
    under the same relative path and file name (PNG, BMP and WebP losslessly; JPEG at quality 95).

    ``purifier`` takes images with ``purifier.channels`` channels: grey images are repeated to RGB for a
    3-channel purifier; an RGB image for a 1-channel purifier is an error. ``size`` resizes every
    image to a square of that side first; without it all images must share one size. Returns the
    written paths, in sorted source order. Errors (no images, mixed sizes, channels) are one line."""
    import numpy as np
    from PIL import Image

    from robustlab.data.arrays import uint8_images_to_tensor
    from robustlab.data.image_folder import (
        _GRAY_MODES,
        decode_image,
        folder_to_folder,
        probe_image,
    )
    from robustlab.progress import progress as show_progress

    if batch_size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {batch_size}")
    if size is not None and size < 1:
        raise RobustlabError(f"size must be >= 1, got {size}")
    src, dst, sources = folder_to_folder(in_dir, out_dir)
    channels = int(purifier.channels)
    probes = [probe_image(p) for p in sources]
    if channels == 1:
        rgb = [p for p, (mode, _, _) in zip(sources, probes) if mode not in _GRAY_MODES]
        if rgb:
            raise RobustlabError(f"the purifier takes grey (1-channel) images, but {rgb[0].relative_to(src)} is colour; "
                                 f"use a purifier trained on RGB images")
    if size is None:
        shapes = sorted({(h, w) for _, h, w in probes})
        if len(shapes) > 1:
            first = next(p for p, (_, h, w) in zip(sources, probes) if (h, w) == shapes[0])
            other = next(p for p, (_, h, w) in zip(sources, probes) if (h, w) == shapes[1])
            raise RobustlabError(
                f"images of different sizes in {src}: {first.relative_to(src)} is {shapes[0][1]}x{shapes[0][0]}, "
                f"{other.relative_to(src)} {shapes[1][1]}x{shapes[1][0]} ({len(shapes)} sizes); give a size to resize "
                f"them all to (--size)")
    device = next((t.device for t in purifier.parameters()), torch.device("cpu"))
    written = []
    bar = show_progress(total=len(sources), desc="purify", unit="image", enabled=progress)
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        arrays = np.stack([decode_image(p, size, channels=3 if channels == 3 else None) for p in chunk])
        x = uint8_images_to_tensor(arrays, str(src)).to(device)
        with torch.no_grad():
            out = purifier(x)
        pixels = torch.round(out * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for k, path in enumerate(chunk):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[k][..., 0] if channels == 1 else pixels[k])
            extra = {"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}
            if target.suffix.lower() == ".webp":
                extra = {"lossless": True}
            image.save(target, **extra)
            written.append(target)
        bar.update(len(chunk))
    bar.close()
    return written
