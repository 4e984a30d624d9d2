"""Random views of a batch for the equivariance defense, and the way back for feature maps.

A view is an affine resampling of the image (flip, resized crop, small rotation; the identity for a
photometric view) followed by a photometric change (brightness, contrast, saturation, grayscale; none
for a geometric view). All views of all images go through one ``grid_sample`` call, so the defense
batches across images and transformations. :func:`back_to_reference` maps a view's feature map back
into the frame of the untransformed image (the inverse affine map applied to the map itself) with a
mask of the positions the view saw, which is what makes a dense (N, C, h, w) feature comparable
across views: equivariance, not invariance. Vector features (N, D) have no frame: they are compared
as they are.

Coordinates are ``affine_grid``'s normalized ones ([-1, 1], ``align_corners=False``): the view's
pixel at p reads the image at ``A p + b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustlab.errors import RobustlabError

KINDS = ("flip", "crop", "rotate", "color")


@dataclass
class ViewSettings:
    """The ranges views are drawn from: ``kinds`` cycled over the views (view j is of kind
    ``kinds[j % len(kinds)]``); ``crop``: smallest side of a resized crop (fraction of the image);
    ``angle``: largest rotation (degrees); ``jitter``: brightness, contrast and saturation factors in
    [1 - jitter, 1 + jitter]; ``gray``: chance that a colour view of an RGB image is made gray."""

    kinds: tuple[str, ...] = KINDS
    crop: float = 0.6
    angle: float = 15.0
    jitter: float = 0.8
    gray: float = 0.2


@dataclass
class Views:
    """``k`` views of each of ``n`` images, view-major (view j of image i at row ``j * n + i``).

    theta, inverse: (k n, 2, 3) the affine maps (view -> image) and their inverses; color: (k n, 3)
    brightness, contrast, saturation factors; gray: (k n,) bool; geometric: any map not the identity."""

    n: int
    k: int
    theta: torch.Tensor
    inverse: torch.Tensor
    color: torch.Tensor
    gray: torch.Tensor
    geometric: bool


def parse_kinds(spec: str) -> tuple[str, ...]:
    """``"flip+crop"`` (or ``"flip,crop"``) -> ("flip", "crop"); an unknown kind is an error naming the
    known ones."""
    kinds = tuple(k.strip() for k in str(spec).replace("+", ",").split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise RobustlabError(f"defense 'equivariance': transforms must be a list of {', '.join(KINDS)} joined by '+', "
                             f"got {spec!r}")
    return kinds


def draw_views(n: int, k: int, settings: ViewSettings, generator: torch.Generator | None,
               device: torch.device, dtype: torch.dtype) -> Views:
    """Draw ``k`` random views for each of ``n`` images (all numbers from ``generator``)."""
    m = n * k

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(m, generator=generator, device=device, dtype=dtype)

    kind = torch.tensor([KINDS.index(settings.kinds[j % len(settings.kinds)]) for j in range(k)], device=device)
    kind = kind.repeat_interleave(n)
    a = torch.eye(2, device=device, dtype=dtype).repeat(m, 1, 1)
    b = torch.zeros(m, 2, device=device, dtype=dtype)
    # every random number is drawn for every view, whatever its kind, so draws do not depend on kinds
    side, aspect = uniform(settings.crop, 1.0), uniform(math.log(0.8), math.log(1.2)).exp()
    shift = uniform(-1.0, 1.0), uniform(-1.0, 1.0)
    angle = uniform(-settings.angle, settings.angle) * (math.pi / 180)
    color = torch.stack([uniform(1 - settings.jitter, 1 + settings.jitter) for _ in range(3)], dim=1).clamp_min(0)
    gray = torch.rand(m, generator=generator, device=device) < settings.gray

    flip = kind == KINDS.index("flip")
    a[flip, 0, 0] = -1.0
    crop = kind == KINDS.index("crop")
    sx = (side * aspect.sqrt()).clamp(max=1.0)
    sy = (side / aspect.sqrt()).clamp(max=1.0)
    a[crop, 0, 0], a[crop, 1, 1] = sx[crop], sy[crop]
    b[crop, 0], b[crop, 1] = ((1 - sx) * shift[0])[crop], ((1 - sy) * shift[1])[crop]
    rot = kind == KINDS.index("rotate")
    cos, sin = angle.cos(), angle.sin()
    a[rot] = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)[rot]
    photometric = kind == KINDS.index("color")
    color = torch.where(photometric.unsqueeze(1), color, torch.ones_like(color))
    gray = gray & photometric

    a_inv = torch.linalg.inv(a)
    theta = torch.cat([a, b.unsqueeze(2)], dim=2)
    inverse = torch.cat([a_inv, -(a_inv @ b.unsqueeze(2))], dim=2)
    geometric = bool((kind != KINDS.index("color")).any())
    return Views(n, k, theta, inverse, color, gray, geometric)


def apply_views(x: torch.Tensor, views: Views) -> torch.Tensor:
    """The views of the batch ``x`` (N, C, H, W) in [0, 1]: (k N, C, H, W), view-major."""
    rep = x.repeat(views.k, 1, 1, 1)
    if views.geometric:
        grid = F.affine_grid(views.theta.to(x.dtype), list(rep.shape), align_corners=False)
        rep = F.grid_sample(rep, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if bool((views.color != 1).any()) or bool(views.gray.any()):
        rep = _photometric(rep, views.color.to(x.dtype), views.gray)
    return rep


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _photometric(x: torch.Tensor, color: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (RGB only) and grayscale (RGB only), each clamped to [0, 1]."""
    f = color.view(-1, 3, 1, 1)
    x = (x * f[:, 0:1]).clamp(0, 1)
    mean = _luma(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1:2] + mean).clamp(0, 1)
    if x.shape[1] == 3:
        g = _luma(x)
        x = (g + (x - g) * f[:, 2:3]).clamp(0, 1)
        x = torch.where(gray.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)
    return x


def back_to_reference(features: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The views' feature maps (k N, C, h, w) in the frame of the untransformed image, and the mask
    (k N, 1, h, w) of the positions each view saw (None: all, for vector features or views without
    geometry). Vector features (k N, D) come back as they are."""
    if features.dim() != 4 or not views.geometric:
        return features, None
    grid = F.affine_grid(views.inverse.to(features.dtype), list(features.shape), align_corners=False)
    back = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones(features.shape[0], 1, *features.shape[2:], device=features.device, dtype=features.dtype)
    seen = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
    return back, seen.to(features.dtype)
