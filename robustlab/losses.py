"""Per-sample attack objectives. Every function returns a (N,) tensor that an attack *maximizes*.

Untargeted (``targeted=False``): ``labels`` are the true classes and a larger value means closer to a
misclassification. Targeted: ``labels`` are the target classes and a larger value means closer to
predicting the target.

Dense outputs (segmentation): logits (N, C, H, W) with per-pixel labels (N, H, W). Every objective
is computed per pixel and averaged over the pixels of each sample (:func:`per_sample`), so attacks
maximize the mean per-pixel loss with no change of their own.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from robustlab.errors import RobustlabError


def per_sample(objective: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``objective`` with per-pixel values (N, H, W) (dense logits and labels) averaged over each
    sample's pixels to (N,); per-sample values pass unchanged."""

    @functools.wraps(objective)
    def reduced(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
        out = objective(logits, labels, targeted)
        return out.flatten(1).mean(dim=1) if out.dim() > 1 else out

    return reduced


def _true_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return true, other


@per_sample
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """CE of the labels (untargeted), or minus CE of the targets (targeted)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return -ce if targeted else ce


@per_sample
def cw_margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Carlini-Wagner margin: ``max_{j != y} z_j - z_y`` (untargeted; > 0 means misclassified), or
    ``z_t - max_{j != t} z_j`` (targeted; > 0 means the target is predicted)."""
    true, other = _true_and_best_other(logits, labels)
    return true - other if targeted else other - true


@per_sample
def dlr(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): a margin divided by a spread of the top logits,
    so the value does not change when the logits are rescaled.

    Untargeted: ``cw_margin / (z_pi1 - z_pi3)`` (needs 3 classes). Targeted: the margin of the target
    over the best other class, divided by ``z_pi1 - (z_pi3 + z_pi4) / 2`` (needs 4 classes); the best
    other class is usually the true one, which makes it the published DLR-targeted loss.
    """
    if logits.shape[1] < 3:
        raise RobustlabError("the DLR loss needs at least 3 classes; use loss=ce or loss=cw")
    top = logits.sort(dim=1, descending=True).values
    margin = cw_margin(logits, labels, targeted)
    if targeted:
        if logits.shape[1] < 4:
            raise RobustlabError("the targeted DLR loss needs at least 4 classes; use loss=ce or loss=cw")
        scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3])
    else:
        scale = top[:, 0] - top[:, 2]
    return margin / (scale + 1e-12)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The per-sample objective called ``name`` (``ce``, ``cw`` or ``dlr``)."""
    if name not in LOSSES:
        raise RobustlabError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    return LOSSES[name]
