"""Transforms applied per batch: the one seam between decoded images and the model.

A transform is any callable on a float32 batch (N, C, H, W) with values in [0, 1] that returns a
float32 batch (N, C', H', W') in [0, 1]. If it has a ``generator`` parameter (or ``**kwargs``) it is
called as ``t(x, generator=g)`` with the torch.Generator the caller passed to ``batch()``, so random
transforms (corruptions) are reproducible per batch; otherwise as ``t(x)``. A transform may also
have ``output_shape((C, H, W)) -> (C', H', W')`` so a data set knows its image shape without
decoding an image. Data sets apply transforms batch by batch (``data.with_transform(t)`` or
``load_dataset(..., transform=t)``), never to a whole data set at once.

Built in: :class:`Resize` (to an exact size), :class:`ResizeShorter` (shorter side, aspect kept),
:class:`CenterCrop`, :class:`Compose`, and :func:`resize_center_crop` / :func:`transform_for_model`
for the usual evaluation preprocessing (resize the shorter side to ``input_size / crop_pct``, then
crop the centre ``input_size``, as timm's ``crop_pct``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from robustlab.errors import RobustlabError

Shape = tuple[int, int, int]


@runtime_checkable
class Transform(Protocol):
    """A per-batch transform: float32 (N, C, H, W) in [0, 1] -> float32 (N, C', H', W') in [0, 1]."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


class BatchTransform:
    """Base of the built-in transforms: a name, JSON parameters, and the output shape."""

    name = "transform"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def output_shape(self, shape: Shape) -> Shape:
        """(C, H, W) of an output image for an input image of shape ``shape``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """JSON description: ``{"name": ..., "params": {...}}``."""
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _size_pair(size: object, what: str) -> tuple[int, int]:
    """An int or an (H, W) pair of positive ints, as (H, W)."""
    values = [size, size] if isinstance(size, int) else size
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(v, bool) for v in values):  # type: ignore[union-attr]
            raise TypeError
        h, w = (int(v) for v in values)  # type: ignore[union-attr]
        if [h, w] != list(values):  # type: ignore[arg-type]
            raise TypeError
    except (TypeError, ValueError):
        raise RobustlabError(f"{what} must be a positive integer or (height, width) in pixels, got {size!r}") from None
    if h < 1 or w < 1:
        raise RobustlabError(f"{what} must be positive, got {size!r}")
    return h, w


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking), clamped back into [0, 1]."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


class Resize(BatchTransform):
    """Resize every image to exactly ``size`` = (H, W) (an int means a square), bilinear with
    antialiasing when shrinking; the aspect ratio is not kept."""

    name = "resize"

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair(size, "resize size")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _interpolate(x, self.size)

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[0], *self.size)

    def params(self) -> dict[str, Any]:
        return {"size": list(self.size)}


class ResizeShorter(BatchTransform):
    """Resize so that the shorter side is ``size`` pixels, keeping the aspect ratio (the longer side
    becomes ``int(size * long / short)``, as torchvision's ``Resize(int)``); bilinear, antialiased."""

    name = "resize_shorter"

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RobustlabError(f"the shorter-side size must be a positive integer (pixels), got {size!r}")
        self.size = size

    def output_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if h <= w:
            return c, self.size, int(self.size * w / h)
        return c, int(self.size * h / w), self.size

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, h, w = self.output_shape((x.shape[1], x.shape[2], x.shape[3]))
        return _interpolate(x, (h, w))

    def params(self) -> dict[str, Any]:
        return {"size": self.size}


class CenterCrop(BatchTransform):
    """Crop the central ``size`` = (H, W) pixels (an int means a square). Images smaller than the
    crop are an error (resize first)."""

    name = "center_crop"

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair(size, "crop size")

    def output_shape(self, shape: Shape) -> Shape:
        ch, cw = self.size
        if shape[1] < ch or shape[2] < cw:
            raise RobustlabError(
                f"cannot crop {ch}x{cw} (HxW) from images of {shape[1]}x{shape[2]}; resize them first"
            )
        return shape[0], ch, cw

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, ch, cw = self.output_shape((x.shape[1], x.shape[2], x.shape[3]))
        top = int(round((x.shape[2] - ch) / 2.0))
        left = int(round((x.shape[3] - cw) / 2.0))
        return x[:, :, top : top + ch, left : left + cw].contiguous()

    def params(self) -> dict[str, Any]:
        return {"size": list(self.size)}


class Compose(BatchTransform):
    """Apply ``transforms`` in order (each one as :func:`call_transform` calls it)."""

    name = "compose"

    def __init__(self, transforms: Sequence[Callable[..., torch.Tensor]]) -> None:
        self.transforms = [as_transform(t) for t in transforms]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def output_shape(self, shape: Shape) -> Shape:
        for t in self.transforms:
            found = output_shape(t, shape)
            if found is None:
                raise NotImplementedError
            shape = found
        return shape

    def params(self) -> dict[str, Any]:
        return {"transforms": [describe_transform(t) for t in self.transforms]}


class _Callable(BatchTransform):
    """A user's callable, called with ``generator=`` only if it takes one."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "name", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
        self.takes_generator = _takes_generator(fn)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.fn(x, generator=generator) if self.takes_generator else self.fn(x)

    def output_shape(self, shape: Shape) -> Shape:
        found = getattr(self.fn, "output_shape", None)
        if found is None:
            raise NotImplementedError
        return tuple(int(v) for v in found(shape))  # type: ignore[return-value]

    def config(self) -> dict[str, Any]:
        config = getattr(self.fn, "config", None)
        return config() if callable(config) else {"name": self.name, "params": {}}

    def __repr__(self) -> str:
        return repr(self.fn)


def _takes_generator(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def as_transform(t: Callable[..., torch.Tensor]) -> BatchTransform:
    """``t`` as a :class:`BatchTransform` (built-ins are returned as they are)."""
    if isinstance(t, BatchTransform):
        return t
    if not callable(t):
        raise RobustlabError(f"a transform must be callable on a batch (N, C, H, W), got {type(t).__name__}")
    return _Callable(t)


def output_shape(t: BatchTransform, shape: Shape) -> Shape | None:
    """The output (C, H, W) of ``t`` for input ``shape``, or None if ``t`` cannot say without running."""
    try:
        return tuple(int(v) for v in t.output_shape(shape))  # type: ignore[return-value]
    except NotImplementedError:
        return None


def describe_transform(t: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """JSON description of a transform (``{"name", "params"}``)."""
    return as_transform(t).config()


def check_transformed(out: object, n: int, t: BatchTransform) -> torch.Tensor:
    """The output of transform ``t`` on ``n`` images, checked: float32 (n, C, H, W) in [0, 1];
    returned in the standard contiguous layout (:func:`standard_layout`)."""
    what = f"transform {t!r}"
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RobustlabError(f"{what} must return a batch ({n}, C, H, W), got {got}")
    if out.dtype != torch.float32:
        raise RobustlabError(f"{what} must return float32 images, got {out.dtype}")
    if n:
        lo, hi = torch.aminmax(out)
        if not (float(lo) >= 0.0 and float(hi) <= 1.0):  # also catches NaN
            raise RobustlabError(f"{what} returned values outside [0, 1] ({float(lo):.4g}..{float(hi):.4g}); clamp them")
    return standard_layout(out)


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with the strides of a fresh contiguous tensor, copied only if it lacks
    them. (``.contiguous()`` is not enough: with one channel a permuted tensor counts as contiguous,
    and convolutions then take other kernels, slower and with other rounding.)"""
    _, c, h, w = x.shape
    if x.stride() == (c * h * w, h * w, w, 1):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def resize_center_crop(
    input_size: int | Sequence[int], crop_pct: float = 1.0, resize: int | None = None
) -> Compose:
    """Resize the shorter side, then crop the centre ``input_size`` (H, W; an int means a square).

    The shorter side becomes ``resize`` pixels if given, else ``floor(max(H, W) / crop_pct)``
    (timm's rule: crop_pct 0.875 resizes 224-pixel inputs to 256, then crops 224; crop_pct 1.0
    resizes straight to the input size, keeping the aspect ratio, and crops the excess).
    """
    h, w = _size_pair(input_size, "input_size")
    if resize is None:
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.0 < crop_pct <= 1.0:
            raise RobustlabError(f"crop_pct must be a fraction in (0, 1], got {crop_pct!r}")
        resize = math.floor(max(h, w) / crop_pct)
    return Compose([ResizeShorter(resize), CenterCrop((h, w))])


def transform_for_model(config: Mapping[str, Any] | object) -> Compose:
    """The evaluation transform a model expects, from its config (a dict such as
    ``robustlab.models.model_config(name)``, or an object such as a ModelCard): ``input_size``
    ((H, W), (C, H, W) as timm writes it, or an int) and optionally ``resize`` (shorter side in
    pixels) and ``crop_pct`` (default 1.0). See :func:`resize_center_crop`."""

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    size = get("input_size")
    if size is None:
        raise RobustlabError("the model config has no input_size; give (height, width) in pixels")
    if not isinstance(size, int) and len(size) == 3:
        size = tuple(size)[1:]  # timm's (C, H, W)
    crop_pct = get("crop_pct")
    return resize_center_crop(size, 1.0 if crop_pct is None else crop_pct, get("resize"))


def resize_images(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize an in-memory batch (N, C, H, W) in [0, 1] to (N, C, size, size) with :class:`Resize`,
    ``chunk`` images at a time (a helper for in-memory sets; data sets resize per batch)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    resize = Resize(size)
    return torch.cat([resize(part) for part in torch.split(x, chunk)])
