"""Small helpers shared by the attack tests (import as ``from helpers import ...``; pytest puts the
tests folder on the path)."""

from __future__ import annotations

import torch
import torch.nn as nn


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's predicted classes, without a graph."""
    with torch.no_grad():
        return model(x).argmax(dim=1)


def robust_fraction(result) -> float:
    """The fraction of an AttackResult's samples the attack did not break."""
    return float((~result.success).float().mean())
