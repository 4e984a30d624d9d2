"""Smoothing noises and the certified radius each gives, in [0, 1] image units.

Every noise is a named :class:`~robustlab.params.Configurable` in :data:`NOISES`. ``sample_(out, x,
generator)`` writes ``out.shape[0]`` noisy copies of one image ``x`` into ``out`` (one call per chunk
of draws, no per-draw Python work); ``radius(p)`` is the certified radius, in the noise's norm, of a
smoothed prediction whose top-class probability is at least ``p`` (> 1/2) under the noise, against
the rest at most ``1 - p`` (the bound CERTIFY uses).

``sigma`` is the per-coordinate standard deviation for the three additive noises, so that noises
are compared at equal variance (as Yang et al. 2020 do):

- ``gaussian`` (L2; Cohen, Rosenfeld & Kolter 2019): N(0, sigma^2 I); ``R = sigma * Phi^-1(p)``.
- ``laplace`` (L1; Teng, Lee & Yuan 2020): i.i.d. Laplace of scale ``b = sigma / sqrt(2)``;
  ``R = -b * log(2 (1 - p))``. Derivation: by Neyman-Pearson the worst shift of L1 size R moves one
  coordinate; the likelihood ratio of Laplace(0, b) to Laplace(R, b) is at most ``exp(R / b)``, and
  the worst-case probability of the top class after the shift is ``1 - (1 - p) * exp(R / b)``
  (the mass ``1 - p`` sits where the ratio is largest); it stays above 1/2 while
  ``R < -b log(2 (1 - p))``.
- ``uniform`` (L1; Yang et al. 2020, also Levine & Feizi 2021): i.i.d. uniform on ``[-a, a]`` with
  ``a = sigma * sqrt(3)``; ``R = 2 a (p - 1/2)``. Derivation: a shift by delta changes the noise
  distribution by total variation ``1 - prod_i (1 - |delta_i| / 2a) <= ||delta||_1 / 2a``, so the
  top class keeps probability at least ``p - ||delta||_1 / 2a``, above 1/2 while
  ``||delta||_1 < 2 a (p - 1/2)``.
- ``ablation`` (L0 over pixels; Levine & Feizi 2020): keep ``keep`` pixels of the ``d = H * W``
  chosen uniformly without replacement, set every channel of the others to ``fill``; radius: the
  largest integer ``rho`` with ``p - Delta(rho) > 1/2``, where ``Delta(rho) = 1 - C(d - rho, keep) /
  C(d, keep)`` is the chance that the kept set meets one of ``rho`` changed pixels (0 when only
  ``p > 1/2`` holds). The base model sees the ablated image (any encoding that depends only on the
  kept pixels and their positions gives a valid certificate; this one keeps the model's input shape).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from scipy.special import gammaln
from scipy.stats import norm as normal_dist

from robustlab.errors import RobustlabError
from robustlab.params import Configurable
from robustlab.registry import Registry


class Noise(Configurable):
    """Base class: ``norm`` is the norm the certificate is in; ``sample_`` and ``radius``."""

    component: ClassVar[str] = "noise"
    norm: ClassVar[str] = ""

    def sample_(self, out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Fill ``out`` (k, C, H, W) with k noisy copies of ``x`` (C, H, W); returns ``out``."""
        raise NotImplementedError

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One noisy copy of each image of ``x`` (N, C, H, W), differentiable in ``x`` (attacks and
        training use it). Default: ``x`` plus noise drawn by :meth:`sample_` around zero."""
        with torch.no_grad():
            draw = self.sample_(torch.empty_like(x), torch.zeros_like(x[0]), generator)
        return x + draw

    def radius(self, p: float, image_shape: tuple[int, ...]) -> float:
        """Certified radius for a lower bound ``p`` (> 1/2 expected; 0 at p = 1/2)."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The number that names the noise level (sigma; for ablation, pixels kept)."""
        return float(self.params["sigma"])

    def validate(self) -> None:
        sigma = self.params.get("sigma")
        if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
            raise RobustlabError(f"noise {self.name!r}: sigma must be > 0, got {sigma:g}")

    def describe(self) -> str:
        return f"{self.name} sigma={self.scale:g} ({self.norm} certificates)"


NOISES: Registry[type[Noise]] = Registry("noise")


def register_noise(cls: type[Noise]) -> type[Noise]:
    return NOISES.register(cls.name)(cls)


def create_noise(name: str, **params: Any) -> Noise:
    """The registered noise ``name`` with these parameters (``create_noise("gaussian", sigma=0.25)``)."""
    return NOISES.get(name)(**params)


@register_noise
class Gaussian(Noise):
    name = "gaussian"
    norm = "l2"
    defaults = {"sigma": 0.25}

    def sample_(self, out, x, generator):
        # x + (z * sigma), in the reference implementation's order of operations
        return out.normal_(generator=generator).mul_(self.params["sigma"]).add_(x)

    def radius(self, p, image_shape):
        return float(self.params["sigma"] * normal_dist.ppf(p))


@register_noise
class Laplace(Noise):
    name = "laplace"
    norm = "l1"
    defaults = {"sigma": 0.25}

    @property
    def b(self) -> float:
        return self.params["sigma"] / math.sqrt(2.0)

    def sample_(self, out, x, generator):
        # inverse CDF from one uniform draw u in [-1/2, 1/2): -b sign(u) log(1 - 2|u|)
        u = out.uniform_(-0.5, 0.5, generator=generator)
        mag = torch.log1p(-2.0 * u.abs()).clamp_min_(-80.0)  # u = -1/2 exactly would give -inf
        return out.copy_(mag.mul_(torch.sign(u)).mul_(-self.b).add_(x))

    def radius(self, p, image_shape):
        if p >= 1.0:
            return math.inf
        return float(max(0.0, -self.b * math.log(2.0 * (1.0 - p))))


@register_noise
class Uniform(Noise):
    name = "uniform"
    norm = "l1"
    defaults = {"sigma": 0.25}

    @property
    def a(self) -> float:
        return self.params["sigma"] * math.sqrt(3.0)

    def sample_(self, out, x, generator):
        return out.uniform_(-self.a, self.a, generator=generator).add_(x)

    def radius(self, p, image_shape):
        return float(max(0.0, 2.0 * self.a * (p - 0.5)))


@register_noise
class Ablation(Noise):
    name = "ablation"
    norm = "l0"
    defaults = {"keep": 45, "fill": 0.0}

    @property
    def scale(self) -> float:
        return float(self.params["keep"])

    def validate(self) -> None:
        if self.params["keep"] < 1:
            raise RobustlabError(f"noise 'ablation': keep (pixels kept) must be >= 1, got {self.params['keep']}")
        if not 0.0 <= self.params["fill"] <= 1.0:
            raise RobustlabError(f"noise 'ablation': fill must be in [0, 1], got {self.params['fill']}")

    def describe(self) -> str:
        return f"ablation keep={self.params['keep']} pixels (l0 certificates, in pixels)"

    def mask(self, k: int, h: int, w: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
        """(k, 1, h, w): 1 on the ``keep`` pixels kept in each of k draws, 0 elsewhere."""
        keep = self.params["keep"]
        if keep > h * w:
            raise RobustlabError(f"noise 'ablation': keep={keep} is more than the {h * w} pixels of the image")
        scores = torch.rand((k, h * w), generator=generator, device=like.device)
        mask = torch.zeros((k, h * w), dtype=like.dtype, device=like.device)
        return mask.scatter_(1, scores.topk(keep, dim=1).indices, 1.0).view(k, 1, h, w)

    def sample_(self, out, x, generator):
        mask = self.mask(out.shape[0], out.shape[-2], out.shape[-1], generator, out)
        return out.copy_(x.expand_as(out)).mul_(mask).add_((1.0 - mask) * self.params["fill"])

    def perturb(self, x, generator):
        mask = self.mask(x.shape[0], x.shape[-2], x.shape[-1], generator, x)
        return x * mask + (1.0 - mask) * self.params["fill"]

    def radius(self, p, image_shape):
        d = int(image_shape[-1] * image_shape[-2])
        keep = self.params["keep"]
        if p <= 0.5:
            return 0.0

        def survive(rho: int) -> float:  # C(d - rho, keep) / C(d, keep)
            if d - rho < keep:
                return 0.0
            return math.exp(gammaln(d - rho + 1) - gammaln(d - rho - keep + 1) - gammaln(d + 1) + gammaln(d - keep + 1))

        lo, hi = 0, d - keep + 1  # p - (1 - survive(rho)) > 1/2 holds at lo; find the largest such rho
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if p - (1.0 - survive(mid)) > 0.5:
                lo = mid
            else:
                hi = mid
        return float(lo)
