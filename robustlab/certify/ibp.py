"""Verified bounds by bound propagation: interval bounds (IBP, Gowal et al. 2018) and CROWN-IBP
(Zhang et al. 2020: IBP forward for the intermediate bounds, a CROWN backward pass of linear
relaxations for the final margin).

A network is a chain of layers (``nn.Sequential``, nested to any depth) of the kinds in
:data:`IBP_LAYERS`; anything else is refused with one line naming the layer and its position. The
perturbation set is a Linf or L2 ball of radius ``eps`` (pixel units) around [0, 1] images,
intersected with the box. Under L2 the first affine layer gets the exact bound of an L2 ball through
a linear map (``|w . d| <= eps * ||w||_2`` per output unit), intersected with the interval of the
box; intervals take over from there.

Bounds on logits are given as margins: ``margin[n, j]`` is a lower bound of ``z_y - z_j`` over the
ball (0 at ``j = y``), and a point is verified when every other class's margin is positive. With a
final Linear layer the margins are computed from the difference of its class rows ("elision of the
last layer"), which is tighter than subtracting logit intervals.

Everything is differentiable with respect to the weights (certified training uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from robustlab.errors import RobustlabError
from robustlab.models.normalize import Normalize

METHODS = ("ibp", "crown-ibp")
NORMS = ("linf", "l2")

_AFFINE = (nn.Linear, nn.Conv2d)
_MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_IDENTITY = (nn.Identity, nn.Dropout)  # Dropout: the identity in eval mode (train mode is refused)
IBP_LAYERS = (*_AFFINE, *_MONOTONE, _BatchNorm, Normalize, *_IDENTITY)
# CROWN's backward pass needs a linear map or a ReLU relaxation per layer; pooling is not relaxed here.
CROWN_LAYERS = (*_AFFINE, nn.ReLU, nn.Flatten, _BatchNorm, Normalize, *_IDENTITY)


@dataclass(frozen=True)
class Layer:
    """One layer of the chain: its position, dotted name in the model, and the module."""

    position: int
    name: str
    module: nn.Module

    def describe(self) -> str:
        return f"layer {self.position} {self.name!r} ({type(self.module).__name__})"


def layers_of(model: nn.Module, supported: tuple[type, ...] = IBP_LAYERS, method: str = "ibp") -> list[Layer]:
    """The model as a chain of supported layers (nested ``nn.Sequential`` flattened in order).

    Raises RobustlabError naming the first layer that is not supported (a module with its own
    ``forward`` is one layer: its internal order is unknown), a BatchNorm or Dropout in training
    mode, or a BatchNorm without running statistics."""
    flat: list[tuple[str, nn.Module]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, nn.Sequential):
            for name, child in m.named_children():
                walk(child, f"{prefix}.{name}" if prefix else name)
        else:
            flat.append((prefix or type(m).__name__, m))

    walk(model, "")
    if not flat:
        raise RobustlabError(f"{method} needs a network with at least one layer; the model is empty")
    layers = []
    for pos, (name, m) in enumerate(flat):
        layer = Layer(pos, name, m)
        if not isinstance(m, supported):
            kinds = ", ".join(sorted({_kind_name(t) for t in supported}))
            raise RobustlabError(f"{method} cannot bound {layer.describe()}; supported layers: {kinds} "
                                 "(in nn.Sequential chains)")
        if isinstance(m, (_BatchNorm, nn.Dropout)) and m.training:
            raise RobustlabError(f"{method} needs eval mode: {layer.describe()} is in training mode (its output "
                                 "depends on the batch or on random draws); call model.eval()")
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise RobustlabError(f"{method} cannot bound {layer.describe()}: it has no running statistics "
                                 "(track_running_stats=False normalizes with each batch's own)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" and method == "crown-ibp":
            raise RobustlabError(f"{method} supports zero padding only; {layer.describe()} pads with "
                                 f"{m.padding_mode!r}")
        layers.append(layer)
    return layers


def _kind_name(t: type) -> str:
    return "BatchNorm (eval)" if t is _BatchNorm else "Dropout (eval)" if t is nn.Dropout else t.__name__


def check_ball(eps: float, norm: str) -> tuple[float, str]:
    """Validated (eps, norm)."""
    norm = str(norm).lower()
    if norm not in NORMS:
        raise RobustlabError(f"bound propagation certifies linf or l2 balls, not {norm!r}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise RobustlabError(f"epsilon must be a number, got {eps!r}") from None
    if not eps >= 0 or eps == float("inf"):
        raise RobustlabError(f"epsilon must be a finite number >= 0, got {eps!r}")
    return eps, norm


# ---------------------------------------------------------------------- interval steps


def _bn_affine(m: _BatchNorm, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift``, both shaped to broadcast over (N, C, ...)."""
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    shape = (1, -1) + (1,) * (dim - 2)
    return scale.view(shape), shift.view(shape)


def _linear_part(m: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map with ``weight`` in place of its own and no bias."""
    if isinstance(m, nn.Linear):
        return F.linear(x, weight)
    return m._conv_forward(x, weight, None)


def interval_step(m: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of one layer's output over the box [lower, upper] of its input."""
    if isinstance(m, (*_AFFINE, _BatchNorm)):
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        if isinstance(m, _BatchNorm):
            scale, shift = _bn_affine(m, mid.dim())
            mid, rad = mid * scale + shift, rad * scale.abs()
        else:
            mid, rad = m(mid), _linear_part(m, rad, m.weight.abs())
        return mid - rad, mid + rad
    if isinstance(m, _IDENTITY):
        return lower, upper
    return m(lower), m(upper)  # Normalize (std > 0), ReLU, pooling, flatten: monotone non-decreasing


def input_box(x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval around ``x`` that holds the ball intersected with the [0, 1] box (an L2 ball's
    enclosing box is its Linf box)."""
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def _first_affine_l2(layers: list[Layer], x: torch.Tensor, eps: float) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Exact bounds of the first affine layer's output over the L2 ball of radius eps around ``x``
    (the box ignored): ``f(x) +- eps * ||row||_2``, where rows include the elementwise scaling of the
    Normalize layers in front. Returns (index of that layer in the chain, lower, upper)."""
    inv = torch.ones_like(x[:1])  # d(layer input)/d(pixel), elementwise, through the prefix
    h = x
    for i, layer in enumerate(layers):
        m = layer.module
        if isinstance(m, _AFFINE):
            mid = m(h)
            rad = eps * _linear_part(m, inv.square(), m.weight.square()).clamp_min(0).sqrt()
            return i, mid - rad, mid + rad
        if isinstance(m, Normalize):
            inv = inv / m.std
        elif isinstance(m, nn.Flatten):
            inv = m(inv)
        elif not isinstance(m, _IDENTITY):
            raise RobustlabError(f"l2 bounds need a Linear or Conv2d layer first (after Normalize/Flatten); "
                                 f"{layer.describe()} comes before it")
        h = m(h)
    raise RobustlabError("l2 bounds need a Linear or Conv2d layer in the network; it has none")


def propagate(layers: list[Layer], x: torch.Tensor, eps: float, norm: str,
              stop: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Interval bounds of the input of every layer (and of the output, last), up to layer ``stop``
    (exclusive; None: all). Entry i bounds the input of layer i."""
    stop = len(layers) if stop is None else stop
    lo, hi = input_box(x, eps, norm)
    bounds = [(lo, hi)]
    l2_at, l2_lo, l2_hi = _first_affine_l2(layers, x, eps) if norm == "l2" else (-1, None, None)
    for i, layer in enumerate(layers[:stop]):
        lo, hi = interval_step(layer.module, lo, hi)
        if i == l2_at:  # both hold: keep the tighter of the box's interval and the ball's exact bound
            lo, hi = torch.maximum(lo, l2_lo), torch.minimum(hi, l2_hi)
        bounds.append((lo, hi))
    return bounds


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of every logit of ``model`` over the ball (IBP)."""
    eps, norm = check_ball(eps, norm)
    return propagate(layers_of(model), x, eps, norm)[-1]


# ---------------------------------------------------------------------- margins


def _margin_spec(y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, C): row j is e_y - e_j (zero at j = y)."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def ibp_margins(layers: list[Layer], x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """(N, C) lower bounds of ``z_y - z_j`` by IBP, the last layer elided when it is Linear."""
    last = layers[-1].module
    if isinstance(last, nn.Linear):
        lo, hi = propagate(layers, x, eps, norm, stop=len(layers) - 1)[-1]
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # (N, C, D): w_y - w_j
        margin = torch.einsum("ncd,nd->nc", w, mid) - torch.einsum("ncd,nd->nc", w.abs(), rad)
        if last.bias is not None:
            margin = margin + (last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0))
        return margin
    lo, hi = propagate(layers, x, eps, norm)[-1]
    margin = lo.gather(1, y[:, None]) - hi
    return margin.scatter(1, y[:, None], 0.0)


def crown_ibp_margins(layers: list[Layer], x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """(N, C) lower bounds of ``z_y - z_j`` by CROWN-IBP: interval bounds of every ReLU's input, then
    one backward pass of linear bounds (CROWN's relaxation: upper line through (l, 0) and (u, u); lower
    line of slope 1 where u > -l, else 0) from the margin to the input ball."""
    bounds = propagate(layers, x, eps, norm)
    n = x.shape[0]
    out = bounds[-1][0]
    classes = out.shape[1]
    a = _margin_spec(y, classes, out.dtype)  # (N, K, *shape of the current layer's output)
    const = torch.zeros(n, classes, dtype=out.dtype, device=out.device)
    for i in range(len(layers) - 1, -1, -1):
        m = layers[i].module
        lo, hi = bounds[i]  # the layer's input
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                const = const + a @ m.bias
            a = a @ m.weight
        elif isinstance(m, nn.Conv2d):
            k = a.shape[1]
            if m.bias is not None:
                const = const + torch.einsum("nkchw,c->nk", a, m.bias)
            a = _conv_backward(m, a.reshape(n * k, *a.shape[2:]), lo.shape[1:]).reshape(n, k, *lo.shape[1:])
        elif isinstance(m, nn.Flatten):
            a = a.reshape(n, a.shape[1], *lo.shape[1:])
        elif isinstance(m, (Normalize, _BatchNorm)):
            if isinstance(m, Normalize):
                scale, shift = 1.0 / m.std, -m.mean / m.std
            else:
                scale, shift = _bn_affine(m, lo.dim())
            scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)  # over the spec dimension
            const = const + (a * shift).flatten(2).sum(2)
            a = a * scale
        elif isinstance(m, nn.ReLU):
            lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
            unstable = (lo < 0) & (hi > 0)
            up_slope = torch.where(hi <= 0, 0.0, torch.where(lo >= 0, 1.0, hi / (hi - lo).clamp_min(1e-12)))
            up_bias = torch.where(unstable, -up_slope * lo, 0.0)
            low_slope = torch.where(hi <= 0, 0.0, torch.where(lo >= 0, 1.0, (hi > -lo).to(a.dtype)))
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            const = const + (neg * up_bias).flatten(2).sum(2)
            a = pos * low_slope + neg * up_slope
        # identity layers: nothing to do
    a = a.flatten(2)
    x0 = x.flatten(1).unsqueeze(1)
    if norm == "linf":
        lo, hi = input_box(x, eps, norm)
        mid, rad = ((hi + lo) / 2).flatten(1).unsqueeze(1), ((hi - lo) / 2).flatten(1).unsqueeze(1)
        return (a * mid).sum(2) - (a.abs() * rad).sum(2) + const
    return (a * x0).sum(2) - eps * a.norm(dim=2) + const


def _conv_backward(m: nn.Conv2d, a: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """``a`` (rows over the conv's output) times the conv's matrix: rows over its input."""
    h_out, w_out = a.shape[-2:]
    extra = []
    for d, size, out in ((0, in_shape[-2], h_out), (1, in_shape[-1], w_out)):
        used = (out - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (m.kernel_size[d] - 1) + 1
        extra.append(size - used)
    return F.conv_transpose2d(a, m.weight, None, m.stride, m.padding, tuple(extra), m.groups, m.dilation)


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                  method: str = "ibp") -> torch.Tensor:
    """(N, C) lower bounds of ``z_y - z_j`` over the ball around each image (0 at ``j = y``), by
    ``method`` (``ibp`` or ``crown-ibp``). Differentiable in the weights."""
    eps, norm = check_ball(eps, norm)
    if method not in METHODS:
        raise RobustlabError(f"unknown bound method {method!r}; use one of {', '.join(METHODS)}")
    if method == "ibp":
        return ibp_margins(layers_of(model), x, y, eps, norm)
    return crown_ibp_margins(layers_of(model, CROWN_LAYERS, method), x, y, eps, norm)


def worst_margin(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) the smallest margin over the classes other than ``y`` (verified where > 0)."""
    return margins.scatter(1, y[:, None], float("inf")).min(dim=1).values


def verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
           method: str = "ibp") -> tuple[torch.Tensor, torch.Tensor]:
    """(verified (N,) bool, lower bound of the worst margin (N,)) for labels ``y``: verified means
    no point of the ball is classified otherwise than ``y`` (a tie counts as not verified)."""
    with torch.no_grad():
        margin = worst_margin(margin_bounds(model, x, y, eps, norm, method), y)
    return margin > 0, margin
