"""Randomized input transformations as defenses: random resize-and-pad (Xie et al. 2018), random crop
and rescale, and total-variation minimization over a random pixel mask (Guo et al. 2018).

All are randomized: predictions vote over ``draws`` draws, attacks average gradients over as many (EOT).
Resize-and-pad and crop-rescale are one bilinear resampling per image (``grid_sample`` with a
per-image affine map), differentiable, so attacks differentiate them. Total-variation minimization is
an optimisation: attacks see it by BPDA with the identity (Athalye et al. 2018 broke it that way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def _resample(x: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor,
              padding: str) -> torch.Tensor:
    """Output pixel at normalized position p reads the input at ``scale * p + shift`` (per image)."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


@register_defense
class ResizePad(Defense):
    """Random resize-and-pad (Xie et al. 2018): each image is shrunk to a random fraction in
    [1 / max_scale, 1] of its size and placed at a random position on a black canvas of its own size
    (the paper enlarges 299 px images to a random size below 331 px and pads to 331: the same
    transform, seen at the model's input size)."""

    name = "resize-pad"
    defaults = {"max_scale": 1.107, "draws": 8}
    randomized = True

    def validate(self) -> None:
        if not 1.0 < self.params["max_scale"] <= 2.0:
            raise RobustlabError(f"defense 'resize-pad': max_scale must be in (1, 2], got {self.params['max_scale']}")
        if self.params["draws"] < 1:
            raise RobustlabError(f"defense 'resize-pad': draws must be >= 1, got {self.params['draws']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        size = 1 / self.params["max_scale"] + (1 - 1 / self.params["max_scale"]) * _uniform(n, generator, dev)
        # the image covers [c - size, c + size] of the canvas [-1, 1]; c uniform where it fits
        cx = (1 - size) * (2 * _uniform(n, generator, dev) - 1)
        cy = (1 - size) * (2 * _uniform(n, generator, dev) - 1)
        return _resample(x, 1 / size, -cx / size, -cy / size, padding="zeros")


@register_defense
class CropRescale(Defense):
    """Random crop and rescale (Guo et al. 2018): a random square crop of ``crop`` of the image's side,
    rescaled to the full size."""

    name = "crop-rescale"
    defaults = {"crop": 0.9, "draws": 8}
    randomized = True

    def validate(self) -> None:
        if not 0.3 <= self.params["crop"] < 1.0:
            raise RobustlabError(f"defense 'crop-rescale': crop must be in [0.3, 1), got {self.params['crop']}")
        if self.params["draws"] < 1:
            raise RobustlabError(f"defense 'crop-rescale': draws must be >= 1, got {self.params['draws']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, dev, c = x.shape[0], x.device, self.params["crop"]
        scale = torch.full((n,), c, dtype=x.dtype, device=dev)
        sx = (1 - c) * (2 * _uniform(n, generator, dev) - 1)
        sy = (1 - c) * (2 * _uniform(n, generator, dev) - 1)
        return _resample(x, scale, sx, sy, padding="border")


def total_variation_minimize(x: torch.Tensor, keep: torch.Tensor, weight: float, steps: int) -> torch.Tensor:
    """argmin_z ||keep * (z - x)||_2^2 + weight * TV(z) over z in [0, 1], per image, by ``steps`` Adam
    steps from x (TV: the sum of absolute differences between neighbouring pixels, anisotropic, with a
    small smoothing so it has a gradient at 0). ``keep`` (same shape as x) masks the pixels the
    reconstruction must stay near; the others are filled in by the TV term."""
    z = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.02)
    with torch.enable_grad():
        for _ in range(steps):
            dh = z[..., 1:, :] - z[..., :-1, :]
            dw = z[..., :, 1:] - z[..., :, :-1]
            tv = torch.sqrt(dh**2 + 1e-6).flatten(1).sum(1) + torch.sqrt(dw**2 + 1e-6).flatten(1).sum(1)
            fit = (keep * (z - x) ** 2).flatten(1).sum(1)
            opt.zero_grad()
            (fit + weight * tv).sum().backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(0, 1)
    return z.detach()


@register_defense
class TotalVariation(Defense):
    """Total-variation minimization (Guo et al. 2018): drop each pixel with probability ``drop``, then
    reconstruct the image of least total variation near the kept pixels (``weight``: the TV term's
    weight, ``steps``: optimisation steps). Randomized and not differentiable: attacks use BPDA with
    the identity and EOT."""

    name = "tv-min"
    defaults = {"drop": 0.3, "weight": 0.03, "steps": 40, "draws": 4}
    randomized = True
    differentiable = False
    iterative = True

    def validate(self) -> None:
        p = self.params
        if not 0 <= p["drop"] < 1:
            raise RobustlabError(f"defense 'tv-min': drop must be in [0, 1), got {p['drop']}")
        if p["weight"] <= 0 or p["steps"] < 1 or p["draws"] < 1:
            raise RobustlabError("defense 'tv-min': weight must be > 0, steps and draws >= 1")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mask_shape = (x.shape[0], 1, *x.shape[2:])  # a pixel is dropped in every channel at once
        keep = (torch.rand(mask_shape, generator=generator, device=x.device) >= self.params["drop"]).to(x.dtype)
        return total_variation_minimize(x, keep.expand_as(x), self.params["weight"], self.params["steps"])
