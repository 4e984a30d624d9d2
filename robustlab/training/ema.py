"""Exponential moving average of a model's weights (Polyak averaging), kept as a separate model.

Weight averaging improves robust accuracy and smooths robust overfitting (e.g. Gowal et al. 2020,
"Uncovering the Limits of Adversarial Training"; Rebuffi et al. 2021). The average is updated after
each optimizer step with decay ``min(decay, (1 + t) / (10 + t))`` at update ``t``, so early updates
are not dominated by the random initialization. Floating-point buffers (BatchNorm running
statistics) are averaged the same way; integer buffers are copied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEMA:
    """``ModelEMA(model, decay)``; ``update(model)`` after each step; ``module`` is the averaged
    model (eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        src = model.state_dict()
        for name, avg in self.module.state_dict().items():
            value = src[name].detach()
            if avg.is_floating_point():
                avg.lerp_(value.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.updates = int(updates)
