"""The attack on models whose outputs saturate the softmax: a margin loss in place of cross-entropy.

The Max-Mahalanobis-center head (:mod:`robustlab.models.mmc`) outputs ``-||z - mu_k||^2``; with its
centers on a sphere of radius C the gaps between these logits are of order C^2 (222 at C = 10), the
softmax underflows to one-hot, and the cross-entropy's gradient is exactly zero at every point the
model fits well: attacks on cross-entropy see nothing (Pang et al. 2020 evaluate MMC with margin
attacks for this reason). The margin between logits is linear in the features there
(``logit_y - logit_k = 2 <z, mu_y - mu_k>``), so margin losses keep their gradients.

Declared as a defense (``margin-loss``): predictions go through unchanged, and the adaptive attacker
maximizes the DLR loss (a margin, invariant to the logits' scale) wherever the attack as given
maximizes cross-entropy (``Attack.with_loss``: PGD's ``loss=ce`` becomes ``loss=dlr``, APGD-CE becomes
APGD-DLR); the attack
as given still runs as the non-adaptive one. A checkpoint trained with the ``mmc`` or ``mmc-at``
recipe records it in its card, so its evaluation is adaptive.
"""

from __future__ import annotations

import torch

from robustlab.defenses.base import Defense, register_defense


@register_defense
class MarginLoss(Defense):
    """Identity for prediction; adaptive attacks maximize the DLR margin in place of cross-entropy
    (models whose logits saturate the softmax: the MMC head)."""

    name = "margin-loss"
    defaults: dict = {}
    attack_loss = "dlr"

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x
