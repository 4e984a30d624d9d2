"""Max-Mahalanobis centers (Pang, Xu, Dong, Du, Chen & Zhu, "Rethinking Softmax Cross-Entropy Loss for
Adversarial Robustness", ICLR 2020; the centers from Pang, Du & Zhu, "Max-Mahalanobis Linear
Discriminant Analysis Networks", ICML 2018).

The network's output is read as features ``z`` (one per class dimension); the K class centers ``mu_k``
lie on a sphere of radius C with the largest equal separation (pairwise inner product ``-C^2/(K-1)``).
The MMC loss trains ``||z - mu_y||^2 / 2`` (recipe ``mmc``); the prediction rule is the nearest center.
:class:`MMCHead` makes that rule the model's output, ``logits_k = -||z - mu_k||^2``, so attacks and
evaluations work on it unchanged. Cross-entropy is not the loss for this rule: the logit gaps are of
order C^2 and saturate the softmax, so its gradient vanishes; attacks must take a margin (the model's
card declares the ``margin-loss`` defense, :mod:`robustlab.defenses.margin`, which makes the
evaluation's adaptive attacks do so). As a model option: ``create_model(name, head="mmc:C")``
(recorded in the card's ``arch_kwargs``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustlab.errors import RobustlabError


def mm_centers(num_classes: int, radius: float, dim: int | None = None) -> torch.Tensor:
    """(K, dim) Max-Mahalanobis centers (dim defaults to K): ``mu_1 = e_1``, then each ``mu_i`` solves
    ``<mu_i, mu_j> = -1/(K-1)`` for ``j < i`` on its first ``i - 1`` coordinates, its i-th coordinate
    completing unit length; all scaled to ``radius``."""
    k, dim = int(num_classes), int(dim or num_classes)
    if k < 2 or dim < k:
        raise RobustlabError(f"MMC centers need at least 2 classes and dim >= classes, got {k} classes, dim {dim}")
    if not radius > 0:
        raise RobustlabError(f"MMC radius must be > 0, got {radius!r}")
    mu = torch.zeros(k, dim, dtype=torch.float64)
    mu[0, 0] = 1.0
    for i in range(1, k):
        for j in range(i):
            mu[i, j] = -(1.0 / (k - 1) + mu[i] @ mu[j]) / mu[j, j]
        mu[i, i] = math.sqrt(max(0.0, 1.0 - float(mu[i] @ mu[i])))
    return (radius * mu).float()


class MMCHead(nn.Module):
    """``body``'s output ``z`` to the MMC prediction rule: ``logits_k = -||z - mu_k||^2``."""

    def __init__(self, body: nn.Module, num_classes: int, radius: float) -> None:
        super().__init__()
        self.body = body
        self.radius = float(radius)
        self.register_buffer("centers", mm_centers(num_classes, radius), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return -(z.unsqueeze(1) - self.centers.to(z.dtype)).pow(2).sum(dim=2)

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}"


def parse_head(spec: str) -> float | None:
    """The radius of a head option ``"mmc:C"`` (``"mmc"``: C = 10), or None for ``"linear"`` (default)."""
    if not isinstance(spec, str):
        raise RobustlabError(f"head must be a string (linear or mmc:C), got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name == "linear" and not arg:
        return None
    if name == "mmc":
        try:
            radius = float(arg) if arg else 10.0
        except ValueError:
            raise RobustlabError(f"head {spec!r}: give the centers' radius, e.g. mmc:10") from None
        if not radius > 0:
            raise RobustlabError(f"head {spec!r}: the radius must be > 0")
        return radius
    raise RobustlabError(f"unknown head {spec!r}; choose linear or mmc:C")
