"""BPDA through k-winners-take-all: the attack a k-WTA model's declared defense (``sampled-gradients``)
adds to its adaptive attacks.

k-WTA's gradients are those of the winners only, and which units win changes discontinuously with the
input, so gradient attacks on the real model stall (Tramer et al. 2020 estimate the gradient by
sampling instead, which ``sampled-gradients`` does with EOT). This attack is BPDA (Athalye et al. 2018)
with a smooth surrogate: while it runs, every :class:`~robustlab.models.kwta.KWTA` layer of the model is
swapped for a :class:`~robustlab.models.kwta.SmoothKWTA` (the same forward values, the backward pass of
a sigmoid-gated relaxation around the layer's threshold) and APGD attacks that; the layers are put back
afterwards and success is judged on the real model. A defended model is attacked through its real
pipeline (``DefendedModel.naive()``: the noise of ``sampled-gradients``' attacker view left out). A model
without k-WTA layers gets plain APGD.
Measured on the MNIST k-WTA model (benchmarks/results/kwta_bpda.txt): APGD-CE through the surrogate
leaves 0% where sampled gradients over 64 draws leave 9%, at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks.base import Attack, AttackResult, create_attack, register_attack
from robustlab.errors import RobustlabError
from robustlab.models.kwta import swap_kwta


@register_attack
class KWTABPDA(Attack):
    """APGD (``loss`` ce or dlr, ``steps``, ``restarts``) through smooth k-WTA layers of temperature
    ``tau`` (a fraction of each layer's spread); success judged on the real k-WTA model."""

    name = "kwta-bpda"
    norms = ("linf", "l2")
    defaults = {"steps": 100, "restarts": 1, "tau": 0.1, "loss": "ce"}
    choices = {"loss": ("ce", "dlr")}

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.params["tau"], (int, float)) and self.params["tau"] > 0):
            raise RobustlabError(f"attack 'kwta-bpda': tau must be > 0, got {self.params['tau']!r}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        inner = create_attack(f"apgd-{p['loss']}", self.threat, targeted=self.targeted, steps=p["steps"],
                              restarts=p["restarts"])
        # a defended model: its real pipeline (the attacker's view of ``sampled-gradients`` adds noise,
        # which BPDA does not need and which costs it most of its strength)
        target = model.naive() if callable(getattr(model, "naive", None)) else model
        swap_kwta(model, p["tau"])
        try:
            result = inner.run(target, x, y, generator)
        finally:
            swap_kwta(model, None)
        result.success = self.is_success(self.logits(target, result.x_adv), y)
        result.forwards = result.forwards + 1
        return result
