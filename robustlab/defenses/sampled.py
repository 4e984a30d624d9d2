"""The attack on models whose gradients are masked by discontinuous activations (k-winners-take-all):
gradients estimated by sampling.

Tramer, Carlini, Brendel & Madry ("On Adaptive Attacks to Adversarial Example Defenses", NeurIPS 2020)
broke k-WTA, whose gradients are discontinuous and uninformative at the input itself, by averaging the
gradient over random points near the input. Declared as a defense (``sampled-gradients``): predictions
go through unchanged (the identity, one pass), while the attacker's view adds Gaussian noise of
standard deviation ``sigma`` to the input, so the attacks' EOT over ``draws`` draws computes the
sampled gradient estimate ``mean_i grad f(x + sigma * n_i)``. A k-WTA checkpoint trained with
``robustlab train --activation kwta:R`` records it in its card, so its evaluation is adaptive. It also
declares ``kwta-bpda`` (:mod:`robustlab.attacks.kwta_bpda`, BPDA through smooth k-WTA layers), which
the adaptive evaluation adds: on the MNIST k-WTA model it breaks what the sampled estimate leaves.
"""

from __future__ import annotations

import torch

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


@register_defense
class SampledGradients(Defense):
    """Identity for prediction; attacks average gradients over ``draws`` Gaussian-noised copies
    (standard deviation ``sigma``, pixel units) of the input."""

    name = "sampled-gradients"
    defaults = {"sigma": 0.1, "draws": 16}
    attack_randomized = True
    # BPDA through smooth k-WTA layers: stronger and cheaper than the sampled estimate on k-WTA models
    adaptive_attacks = ("kwta-bpda",)

    def validate(self) -> None:
        if not 0.0 < self.params["sigma"] <= 1.0:
            raise RobustlabError(f"defense 'sampled-gradients': sigma must be in (0, 1], got {self.params['sigma']}")
        if self.params["draws"] < 1:
            raise RobustlabError(f"defense 'sampled-gradients': draws must be >= 1, got {self.params['draws']}")

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def attack_transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.params["sigma"] * noise
