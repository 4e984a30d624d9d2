"""Predictors: what the evaluation, verification and metrics ask of a model.

Two things, kept apart because a defended or smoothed classifier answers them differently:

- ``model(x)``: differentiable logits, (N, classes). Attacks use these (and only these).
- ``predict(model, x, generator)``: the label the system outputs for each image, or :data:`ABSTAIN`.
  For a plain ``nn.Module`` it is ``argmax(model(x))``, computed exactly as before the seam existed.
  A module that defines its own ``predict(x, generator)`` (a :class:`Predictor`) may vote over random
  draws (randomized defenses) or abstain (a smoothed classifier whose vote is not significant).

A counted adversarial example, a clean prediction and every accuracy go through :func:`predict`, so
a defense that votes is judged by its vote, with randomness from the generator the runner derives
from (seed, task, batch): resumed and sharded runs give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.checks import check_logits

# The label of a prediction the predictor declined to make (never equal to a class index).
ABSTAIN = -1


class Predictor(nn.Module):
    """Base for modules whose prediction is not simply the argmax of one forward pass.

    Subclasses implement ``forward`` (the differentiable logits attacks use) and may override
    :meth:`predict`. ``randomized``: the output depends on random draws (attacks need EOT);
    ``draws``: how many draws a prediction votes over (1: one forward pass).
    """

    randomized: bool = False
    draws: int = 1

    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels (N,) int64, or ABSTAIN (a segmentation model: (N, H, W), per pixel). Default: the
        majority over ``draws`` forward passes whose
        randomness comes from ``generator`` (ties go to the smaller class index); with one draw, the
        argmax of the logits."""
        with torch.no_grad():
            counts = None
            for _ in range(self.draws):
                logits = check_logits(self.forward_with(x, generator), x.shape[0], dense=None)
                if self.draws == 1:
                    return logits.argmax(dim=1)
                if counts is None:
                    counts = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
                counts.scatter_add_(1, logits.argmax(dim=1, keepdim=True), torch.ones_like(counts[:, :1]))
            return counts.argmax(dim=1)

    def forward_with(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One forward pass whose random draws come from ``generator`` (default: ``forward``)."""
        return self(x)


def predict(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None,
            dense: bool = False) -> torch.Tensor:
    """The labels ``model`` outputs for the batch ``x`` (no graph): its own ``predict`` if it has one,
    else the argmax of its logits; (N,), or with ``dense`` (a segmentation model) (N, H, W). The
    caller puts the model in eval mode."""
    own = getattr(model, "predict", None)
    if callable(own):
        return own(x, generator)
    with torch.no_grad():
        return check_logits(model(x), x.shape[0], dense=dense).argmax(dim=1)


def is_randomized(model: nn.Module) -> bool:
    """Whether the model declares that its outputs depend on random draws."""
    return any(getattr(m, "randomized", False) for m in model.modules())
