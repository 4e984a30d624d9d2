"""k-winners-take-all activations (Xiao, Zhong & Zheng, "Enhancing Adversarial Defense by k-Winners-
Take-All", ICLR 2020).

:class:`KWTA` keeps, for each sample, the ``ceil(ratio * N)`` largest of the ``N`` values of a layer's
whole output (C*H*W for a convolution, the features of a linear layer) and zeroes the rest: a
discontinuous function of the input, which masks gradients. :func:`use_kwta` puts it in place of every
``nn.ReLU`` of a model. As a model option: ``create_model(name, activation="kwta:0.1")`` (recorded in
the card's ``arch_kwargs``, so a loaded checkpoint is rebuilt with it); ``robustlab train --activation
kwta:0.1``. Its honest attack estimates gradients by sampling (defense ``sampled-gradients``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustlab.errors import RobustlabError

ACTIVATIONS = ("relu", "kwta:RATIO")


class KWTA(nn.Module):
    """Per sample, keep the top ``ceil(ratio * N)`` activations of the whole layer output, zero the rest
    (ties at the threshold are all kept). Gradients flow to the kept values only."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        _check_ratio(ratio)
        self.ratio = float(ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        k = max(1, math.ceil(self.ratio * flat.shape[1]))
        threshold = flat.topk(k, dim=1).values[:, -1:]
        return (flat * (flat >= threshold)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:g}"


class SmoothKWTA(nn.Module):
    """The attacker's k-WTA (BPDA): the forward values of :class:`KWTA`, the backward pass of the
    relaxation ``x * sigmoid((x - t) / (tau * s))``, with ``t`` the layer's k-th largest value and ``s``
    its standard deviation per sample (both held fixed), so units just below the threshold, which a
    small step makes winners, get a gradient where the real k-WTA gives them none."""

    def __init__(self, ratio: float, tau: float = 0.1) -> None:
        super().__init__()
        _check_ratio(ratio)
        self.ratio, self.tau = float(ratio), float(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        k = max(1, math.ceil(self.ratio * flat.shape[1]))
        threshold = flat.topk(k, dim=1).values[:, -1:].detach()
        scale = self.tau * flat.detach().std(dim=1, keepdim=True).clamp_min(1e-6)
        soft = flat * torch.sigmoid((flat - threshold) / scale)
        hard = flat * (flat >= threshold)
        return (soft + (hard - soft).detach()).reshape(x.shape)


def swap_kwta(model: nn.Module, tau: float | None) -> int:
    """Replace (in place) every :class:`KWTA` of ``model`` by a :class:`SmoothKWTA` of temperature
    ``tau``, or with ``tau=None`` every SmoothKWTA back by a KWTA. Returns how many were replaced."""
    old, make = (KWTA, lambda m: SmoothKWTA(m.ratio, tau)) if tau is not None else (SmoothKWTA, lambda m: KWTA(m.ratio))
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise RobustlabError(f"k-WTA ratio must be in (0, 1], got {ratio!r}")


def use_kwta(model: nn.Module, ratio: float) -> nn.Module:
    """``model`` with every ``nn.ReLU`` replaced by ``KWTA(ratio)`` (in place; returns ``model``).
    A model with no ``nn.ReLU`` module (a functional ``F.relu`` cannot be replaced) is refused."""
    _check_ratio(ratio)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, KWTA(ratio))
                replaced += 1
    if not replaced:
        raise RobustlabError("activation kwta: the model has no nn.ReLU layer to replace (its ReLUs are functional)")
    return model


def parse_activation(spec: str) -> float | None:
    """The k-WTA ratio of an activation option ``"kwta:RATIO"``, or None for ``"relu"`` (the default)."""
    if not isinstance(spec, str):
        raise RobustlabError(f"activation must be a string ({' or '.join(ACTIVATIONS)}), got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name == "relu" and not arg:
        return None
    if name == "kwta":
        try:
            ratio = float(arg)
        except ValueError:
            raise RobustlabError(f"activation {spec!r}: give the fraction of winners, e.g. kwta:0.1") from None
        _check_ratio(ratio)
        return ratio
    raise RobustlabError(f"unknown activation {spec!r}; choose {' or '.join(ACTIVATIONS)}")
