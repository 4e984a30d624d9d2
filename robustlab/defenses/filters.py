"""Smoothing filters as defenses (feature squeezing, Xu et al. 2018): median and Gaussian smoothing.

Both follow scipy.ndimage (which ART's SpatialSmoothing uses): edges extended by symmetric reflection
(scipy's ``reflect``: the edge pixel repeated), the window of an even size reaching one pixel further
back than forward, the median of an even count being the upper middle value, and a Gaussian kernel
truncated at 4 standard deviations.

Both are differentiable almost everywhere (the median passes the gradient to the pixel it selects), so
the adaptive attack simply differentiates the whole pipeline: no BPDA is needed, and none is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


def symmetric_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Pad the last two dimensions by mirroring with the edge pixel repeated (scipy's ``reflect``)."""
    def pad(t: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
        n = t.shape[dim]
        idx = torch.arange(-before, n + after, device=t.device)
        period = 2 * n
        idx = idx % period
        idx = torch.where(idx >= n, period - 1 - idx, idx)
        return t.index_select(dim, idx)

    return pad(pad(x, -1, left, right), -2, top, bottom)


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median over ``size`` x ``size`` windows of a batch (N, C, H, W), as
    ``scipy.ndimage.median_filter`` (see the module docstring)."""
    before, after = size // 2, (size - 1) // 2
    windows = symmetric_pad(x, before, after, before, after).unfold(2, size, 1).unfold(3, size, 1)
    flat = windows.reshape(*windows.shape[:4], size * size)
    return flat.kthvalue(size * size // 2 + 1, dim=-1).values


def gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels per channel, as
    ``scipy.ndimage.gaussian_filter`` (kernel radius ``int(4 sigma + 0.5)``, symmetric edges)."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    out = F.conv2d(symmetric_pad(x, radius, radius, 0, 0), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(symmetric_pad(out, 0, 0, radius, radius), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@register_defense
class MedianSmoothing(Defense):
    """Median smoothing over ``size`` x ``size`` windows (2..9)."""

    name = "median"
    defaults = {"size": 2}

    def validate(self) -> None:
        if not 2 <= self.params["size"] <= 9:
            raise RobustlabError(f"defense 'median': size must be in 2..9, got {self.params['size']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return median_filter(x, self.params["size"])


@register_defense
class GaussianSmoothing(Defense):
    """Gaussian smoothing with standard deviation ``sigma`` in pixels."""

    name = "gaussian-blur"
    defaults = {"sigma": 1.0}

    def validate(self) -> None:
        if not 0 < self.params["sigma"] <= 10:
            raise RobustlabError(f"defense 'gaussian-blur': sigma must be in (0, 10] pixels, got {self.params['sigma']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_filter(x, self.params["sigma"])
