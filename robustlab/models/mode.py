"""Evaluate without mutating: eval mode for the duration, the caller's per-module modes restored."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


def training_modules(model: nn.Module) -> list[str]:
    """Names of submodules in train mode whose behaviour depends on it (dropout, batch norm)."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)
    return [name or type(m).__name__ for name, m in model.named_modules() if m.training and isinstance(m, kinds)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag
