"""The ``dual-bn`` recipe: adversarial training with separate batch norm for clean and adversarial
mini-batches (AdvProp, Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020;
see ``robustlab.models.dual_bn``)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models.dual_bn import bn_branch, has_dual_bn
from robustlab.training.objectives import PGDAT, _accuracy, register_objective


def _require_dual_bn(model: nn.Module, recipe: str) -> None:
    if not has_dual_bn(model):
        raise RobustlabError(
            f"recipe {recipe!r} needs a model with dual batch norm: convert it first with "
            "robustlab.models.convert_to_dual_bn(model) (robustlab train does this for you)"
        )


@register_objective
class DualBN(PGDAT):
    """Dual batch-norm adversarial training, AdvProp-style (Xie et al., "Adversarial Examples
    Improve Image Recognition", CVPR 2020; Xie & Yuille, "Intriguing Properties of Adversarial
    Training at Scale", ICLR 2020): ``CE(f_clean(x), y) + weight * CE(f_adv(x_adv), y)``, where
    ``f_clean`` routes through the clean BatchNorm branch and ``f_adv`` through the adversarial one,
    and ``x_adv`` is a PGD example found through the adversarial branch (eval mode, like every inner
    maximization here). Each branch's statistics see only its own kind of batch.

    Published (AdvProp, ImageNet): PGD at eps 1..4 (of 255) with eps + 1 iterations of step 1/255,
    loss weights 1 and 1. Defaults here: ``steps`` 5, ``alpha`` eps / (steps - 1) (AdvProp's step
    at every setting, 1/255 at eps 4/255), uniform random start, ``weight`` 1. The model needs dual
    batch norm (``convert_to_dual_bn``); which branch serves at test time is the user's choice
    (clean by default: ``robustlab train --bn``, ``robustlab eval --bn``).
    """

    name = "dual-bn"
    defaults = {"weight": 1.0, "steps": 5, "alpha": None, "random_start": True, "eps_warmup": 0.0}
    needs_dual_bn = True

    def step_size(self, default_factor: float) -> float:
        steps = self.params["steps"]
        return super().step_size(1.0 / max(steps - 1, 1))

    def perturb(self, model, x, y, generator=None):
        _require_dual_bn(model, self.name)
        with bn_branch(model, "adv"):
            return super().perturb(model, x, y, generator)

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        with bn_branch(model, "clean"):
            logits = model(x)
        with bn_branch(model, "adv"):
            logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        ce_adv = F.cross_entropy(logits_adv, y)
        logs = {"clean_acc": _accuracy(logits, y), "adv_acc": _accuracy(logits_adv, y), "ce": ce.detach(),
                "ce_adv": ce_adv.detach()}
        return ce + self.params["weight"] * ce_adv, logs
