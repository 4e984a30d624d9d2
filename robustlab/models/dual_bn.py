"""Dual batch norm: separate BatchNorm statistics and affine parameters for clean and adversarial
inputs (the "two-domain hypothesis" of Xie et al., "Adversarial Examples Improve Image Recognition"
(AdvProp), CVPR 2020, and Xie & Yuille, "Intriguing Properties of Adversarial Training at Scale",
ICLR 2020: clean and adversarial images have different feature statistics, and one BatchNorm
normalizing a mixture of both serves neither well).

:class:`DualBatchNorm` holds two BatchNorm layers of the same kind (1d, 2d or 3d), ``clean`` and
``adv``, and routes every input through the one its ``branch`` names. :func:`convert_to_dual_bn`
replaces every BatchNorm of a model by one, both branches starting as copies of the original (so
outputs do not change). :func:`set_bn_branch` selects a branch for good (e.g. the test-time one),
:func:`bn_branch` for the duration of a ``with`` block. The branch is not part of the state dict: a
checkpoint holds both branches (``...clean.*`` and ``...adv.*``) and its card says which one is used
at test time (``dual_bn: {"test_branch": ...}``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustlab.errors import RobustlabError

BRANCHES = ("clean", "adv")


def check_branch(branch: str) -> str:
    """``branch`` if it names a branch (``clean`` or ``adv``), else RobustlabError."""
    if branch not in BRANCHES:
        raise RobustlabError(f"batch-norm branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    return branch


class DualBatchNorm(nn.Module):
    """Two BatchNorm layers, ``clean`` and ``adv``; ``forward`` uses the one ``branch`` names.

    Build it from an existing BatchNorm (``DualBatchNorm(bn)``: the clean branch is ``bn`` itself,
    the adversarial one a copy), or from a BatchNorm class and its arguments
    (``DualBatchNorm.new(nn.BatchNorm2d, 64)``). Each branch keeps its own running statistics and
    affine parameters; only the branch in use sees the batch (and, in train mode, updates).
    """

    def __init__(self, bn: _BatchNorm, adv: _BatchNorm | None = None, branch: str = "clean") -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm) or (adv is not None and not isinstance(adv, _BatchNorm)):
            raise RobustlabError("DualBatchNorm wraps BatchNorm layers (nn.BatchNorm1d/2d/3d)")
        self.clean = bn
        self.adv = copy.deepcopy(bn) if adv is None else adv
        self.branch = check_branch(branch)

    @classmethod
    def new(cls, kind: type[_BatchNorm], *args, **kwargs) -> "DualBatchNorm":
        """Two fresh BatchNorm layers ``kind(*args, **kwargs)``."""
        return cls(kind(*args, **kwargs), kind(*args, **kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.adv if self.branch == "adv" else self.clean)(x)

    def extra_repr(self) -> str:
        return f"branch={self.branch!r}"


def dual_bn_layers(model: nn.Module) -> list[DualBatchNorm]:
    """The model's DualBatchNorm layers, in module order."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def has_dual_bn(model: nn.Module) -> bool:
    """Whether ``model`` holds at least one DualBatchNorm."""
    return any(isinstance(m, DualBatchNorm) for m in model.modules())


def convert_to_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``model`` (in place) by a :class:`DualBatchNorm` whose branches
    both start from it: the clean branch is the original layer (its statistics and parameters), the
    adversarial branch a copy, so the model computes exactly what it did before. Returns ``model``;
    the branch in use is ``clean``. Layers already dual are left alone; a model without any
    BatchNorm is a RobustlabError (there is nothing to split). A bare BatchNorm given as ``model``
    comes back wrapped."""
    if isinstance(model, _BatchNorm):
        return DualBatchNorm(model)
    converted = 0

    def walk(parent: nn.Module) -> None:
        nonlocal converted
        for name, child in parent.named_children():
            if isinstance(child, DualBatchNorm):
                continue
            if isinstance(child, _BatchNorm):
                setattr(parent, name, DualBatchNorm(child))
                converted += 1
            else:
                walk(child)

    walk(model)
    if converted == 0 and not has_dual_bn(model):
        raise RobustlabError(
            "the model has no BatchNorm layers to split into clean and adversarial branches; "
            "dual batch norm needs an architecture with BatchNorm (e.g. cifar_cnn, preact_resnet18, wideresnet)"
        )
    return model


def set_bn_branch(model: nn.Module, branch: str) -> nn.Module:
    """Route every DualBatchNorm of ``model`` through ``branch`` (``clean`` or ``adv``) from now on;
    returns ``model``. RobustlabError if the model has no dual batch norm."""
    check_branch(branch)
    layers = dual_bn_layers(model)
    if not layers:
        raise RobustlabError(
            f"cannot select the {branch!r} batch-norm branch: the model has no dual batch norm "
            "(only models trained with the dual-bn recipe have one)"
        )
    for m in layers:
        m.branch = branch
    return model


def current_bn_branch(model: nn.Module) -> str | None:
    """The branch the model's DualBatchNorm layers use (None without dual batch norm; ``mixed``
    if they disagree)."""
    branches = {m.branch for m in dual_bn_layers(model)}
    if not branches:
        return None
    return branches.pop() if len(branches) == 1 else "mixed"


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Route every DualBatchNorm of ``model`` through ``branch`` inside the block; each layer's own
    branch is restored on exit. RobustlabError if the model has no dual batch norm."""
    saved = [(m, m.branch) for m in dual_bn_layers(model)]
    set_bn_branch(model, branch)
    try:
        yield model
    finally:
        for m, b in saved:
            m.branch = b
