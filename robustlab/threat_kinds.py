"""Threat models that are not an Lp ball around each image: spatial transformations, adversarial
patches and universal perturbations.

Each is a small value object like :class:`robustlab.threat.ThreatModel`, with the attributes an
attack and the worst-case ensemble read (``norm`` names the kind, ``eps`` is the size of the
budget, ``lower``/``upper`` the box, ``to_dict``, ``project``, ``contains``, ``distance``) and, where
an image alone does not prove membership, the parameters that do:

- :class:`SpatialThreat` (Engstrom et al. 2019): a rotation by at most ``max_angle`` degrees and a
  translation by at most ``max_shift`` pixels in each direction, zero (black) fill. An adversarial
  image is verified by re-rendering it from its per-sample parameters (angle, dx, dy):
  :meth:`SpatialThreat.verify`.
- :class:`PatchThreat` (Brown et al. 2017): a square patch of ``size`` x ``size`` pixels, anywhere in
  the image, with any content in the box; the rest of the image unchanged. Membership is checked from
  the images alone: the changed pixels fit in one such square.
- :class:`UniversalThreat` (Moosavi-Dezfooli et al. 2017): one perturbation in the Lp ball shared by
  every image of a data set (each image clipped to the box). Per image it is the Lp ball; that one
  perturbation explains a whole batch is checked from the images: :meth:`UniversalThreat.shared`.

Lower layers only: this module imports torch and :mod:`robustlab.threat`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.threat import NORMS, ThreatModel, norms

KINDS = ("spatial", "patch", "universal")


def _positive(name: str, value: float, allow_zero: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RobustlabError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise RobustlabError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return v


def _in_box(x_adv: torch.Tensor, lower: float, upper: float, tol: float) -> torch.Tensor:
    flat = x_adv.flatten(1)
    return torch.isfinite(flat).all(dim=1) & ((flat >= lower - tol) & (flat <= upper + tol)).all(dim=1)


# ---------------------------------------------------------------------- spatial


@dataclass(frozen=True)
class SpatialThreat:
    """Rotations by at most ``max_angle`` degrees and translations by at most ``max_shift`` pixels
    (each of x and y), about the image centre, bilinear, pixels from outside the image black."""

    max_angle: float
    max_shift: float
    lower: float = 0.0
    upper: float = 1.0

    norm = "spatial"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_angle", _positive("max_angle", self.max_angle))
        object.__setattr__(self, "max_shift", _positive("max_shift", self.max_shift))
        if self.max_angle > 180:
            raise RobustlabError(f"max_angle must be at most 180 degrees, got {self.max_angle:g}")

    @property
    def eps(self) -> float:
        """Nonzero when the set holds more than the identity (the ensemble skips empty budgets)."""
        return self.max_angle + self.max_shift

    def to_dict(self) -> dict:
        return {"kind": "spatial", **asdict(self)}

    def __str__(self) -> str:
        return f"spatial angle<={self.max_angle:g}deg shift<={self.max_shift:g}px"

    @property
    def bounds(self) -> torch.Tensor:
        """(3,) upper bounds of |angle|, |dx|, |dy|."""
        return torch.tensor([self.max_angle, self.max_shift, self.max_shift])

    def clamp(self, params: torch.Tensor) -> torch.Tensor:
        """Parameters (N, 3) = (angle in degrees, dx, dy in pixels) clamped into the set."""
        b = self.bounds.to(params.device, params.dtype)
        return torch.maximum(torch.minimum(params, b), -b)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) rotated by ``params[:, 0]`` degrees (counter-clockwise) and shifted by
        ``params[:, 1]`` pixels right and ``params[:, 2]`` pixels down. Differentiable in both."""
        n, _, h, w = x.shape
        a = params[:, 0].to(x.dtype) * (math.pi / 180)
        cos, sin = torch.cos(a), torch.sin(a)
        # affine_grid maps output to input coordinates in [-1, 1]; pixel shifts become 2 * s / size.
        tx = -2 * params[:, 1].to(x.dtype) / w
        ty = -2 * params[:, 2].to(x.dtype) / h
        theta = torch.stack([
            torch.stack([cos, -sin * h / w, tx], dim=1),
            torch.stack([sin * w / h, cos, ty], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.clamp(self.lower, self.upper)

    def verify(self, x_adv: torch.Tensor, x: torch.Tensor, params: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Per sample: ``params`` lie in the set and ``x_adv`` is ``x`` transformed by them."""
        inside = (params.abs() <= self.bounds.to(params.device, params.dtype) + 1e-6).all(dim=1)
        same = (self.apply(x, params) - x_adv).flatten(1).abs().amax(dim=1) <= tol
        return inside & same & _in_box(x_adv, self.lower, self.upper, 0.0)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Images cannot be projected onto the set; spatial attacks build their points with
        :meth:`apply`. This keeps them in the box."""
        return x_adv.clamp(self.lower, self.upper)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """What the images alone show (finite, in the box); :meth:`verify` checks membership."""
        return _in_box(x_adv, self.lower, self.upper, tol)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The L2 distance of the images (for information; the budget is in angle and shift)."""
        return norms(x_adv - x, "l2")


# ---------------------------------------------------------------------- patch


def patch_extent(changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (height, width) of the bounding box of the True pixels of ``changed`` (N, H, W);
    0 where none."""
    rows, cols = changed.any(dim=2), changed.any(dim=1)

    def span(m: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(m.shape[1], device=m.device)
        first = torch.where(m, idx, m.shape[1]).amin(dim=1)
        last = torch.where(m, idx, -1).amax(dim=1)
        return (last - first + 1).clamp_min(0)

    return span(rows), span(cols)


@dataclass(frozen=True)
class PatchThreat:
    """A square patch of ``size`` x ``size`` pixels placed anywhere inside the image; its content is
    free within the box and every pixel outside it is unchanged."""

    size: int
    lower: float = 0.0
    upper: float = 1.0

    norm = "patch"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not float(self.size).is_integer() or int(self.size) < 1:
            raise RobustlabError(f"patch size must be a whole number of pixels >= 1, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))

    @property
    def eps(self) -> float:
        return float(self.size)

    def to_dict(self) -> dict:
        return {"kind": "patch", **asdict(self)}

    def __str__(self) -> str:
        return f"patch {self.size}x{self.size}px"

    def check_image(self, h: int, w: int) -> None:
        if self.size > min(h, w):
            raise RobustlabError(f"a {self.size}x{self.size} patch does not fit a {h}x{w} image")

    def apply(self, x: torch.Tensor, patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) with ``patch`` (C, s, s), or one per sample (N, C, s, s), pasted with its
        top-left corner at (``top[i]``, ``left[i]``). Differentiable in the patch."""
        n, c, h, w = x.shape
        s = self.size
        self.check_image(h, w)
        if patch.dim() == 3:
            patch = patch.unsqueeze(0).expand(n, -1, -1, -1)
        r = torch.arange(h, device=x.device).view(1, h) - top.view(n, 1)  # (N, H) row in the patch
        col = torch.arange(w, device=x.device).view(1, w) - left.view(n, 1)
        inside = ((r >= 0) & (r < s)).view(n, 1, h, 1) & ((col >= 0) & (col < s)).view(n, 1, 1, w)
        rr = r.clamp(0, s - 1).view(n, 1, h, 1).expand(n, c, h, s)
        rows = patch.gather(2, rr)  # (N, C, H, s)
        cc = col.clamp(0, s - 1).view(n, 1, 1, w).expand(n, c, h, w)
        placed = rows.gather(3, cc)
        return torch.where(inside, placed.to(x.dtype), x)

    def random_locations(self, n: int, h: int, w: int, generator: torch.Generator | None,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, left) uniform over the positions where the patch fits."""
        self.check_image(h, w)
        top = torch.randint(0, h - self.size + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, w - self.size + 1, (n,), generator=generator, device=device)
        return top, left

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Patch attacks build their points with :meth:`apply`; this keeps them in the box."""
        return x_adv.clamp(self.lower, self.upper)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per sample: finite, in the box, and every changed pixel (any channel by more than ``tol``)
        inside one ``size`` x ``size`` square."""
        changed = ((x_adv - x).abs() > tol).any(dim=1)
        hh, ww = patch_extent(changed)
        return _in_box(x_adv, self.lower, self.upper, tol) & (hh <= self.size) & (ww <= self.size)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The side of the smallest square holding every changed pixel."""
        hh, ww = patch_extent(((x_adv - x).abs() > 0).any(dim=1))
        return torch.maximum(hh, ww).to(x.dtype)


# ---------------------------------------------------------------------- universal


@dataclass(frozen=True)
class UniversalThreat:
    """One perturbation ``delta`` with ``||delta||_norm <= eps`` for every image; an image's
    adversarial point is ``clip(x + delta)`` to the box."""

    base_norm: str
    eps: float
    lower: float = 0.0
    upper: float = 1.0

    norm = "universal"

    def __post_init__(self) -> None:
        if str(self.base_norm).lower() not in NORMS:
            raise RobustlabError(f"unknown norm {self.base_norm!r}; use one of {', '.join(NORMS)}")
        object.__setattr__(self, "base_norm", str(self.base_norm).lower())
        object.__setattr__(self, "eps", _positive("epsilon", self.eps))

    @property
    def ball(self) -> ThreatModel:
        """The per-image Lp threat model."""
        return ThreatModel(self.base_norm, self.eps, self.lower, self.upper)

    @property
    def delta_ball(self) -> ThreatModel:
        """The set of perturbations: the Lp ball around 0 within [-(upper - lower), upper - lower]."""
        span = self.upper - self.lower
        return ThreatModel(self.base_norm, self.eps, -span, span)

    def to_dict(self) -> dict:
        return {"kind": "universal", **asdict(self)}

    def __str__(self) -> str:
        return f"universal {self.base_norm} eps={self.eps:g}"

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (x + delta.unsqueeze(0) if delta.dim() == x.dim() - 1 else x + delta).clamp(self.lower, self.upper)

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (C, H, W) projected onto the perturbation set."""
        return self.delta_ball.project(delta.unsqueeze(0), torch.zeros_like(delta).unsqueeze(0)).squeeze(0)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.ball.project(x_adv, x)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per image: in the Lp ball and the box (that one perturbation serves all: :meth:`shared`)."""
        return self.ball.contains(x_adv, x, tol)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return norms(x_adv - x, self.base_norm)

    def shared(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> bool:
        """Whether one perturbation explains every ``x_adv = clip(x + delta)`` of the batch: per
        coordinate, an unclipped value fixes delta, a value at the box's upper (lower) face only bounds
        it from below (above); the batch is consistent when the bounds leave room for one delta."""
        d = (x_adv - x).flatten(1)
        at_hi = x_adv.flatten(1) >= self.upper - tol
        at_lo = x_adv.flatten(1) <= self.lower + tol
        big = torch.finfo(d.dtype).max
        low = torch.where(at_lo & ~at_hi, torch.full_like(d, -big), d).amax(dim=0)
        high = torch.where(at_hi & ~at_lo, torch.full_like(d, big), d).amin(dim=0)
        return bool((low <= high + 2 * tol).all())


def threat_from_dict(d: dict):
    """Rebuild any threat model from its ``to_dict`` (an Lp one has no ``kind``)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind is None:
        return ThreatModel(**d)
    cls = {"spatial": SpatialThreat, "patch": PatchThreat, "universal": UniversalThreat}.get(kind)
    if cls is None:
        raise RobustlabError(f"unknown threat kind {kind!r}; use one of {', '.join(KINDS)}")
    return cls(**d)
