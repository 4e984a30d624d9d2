"""Recipes that train on extra unlabeled images (``robustlab.training.unlabeled``): robust
self-training (``rst``) and unsupervised adversarial training (``uat``).

The loop mixes unlabeled images into every batch with the labels :meth:`label_unlabeled` gave
them once before training: the teacher's pseudo-labels (``rst``) or -1, none (``uat``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training.objectives import TRADES, _accuracy, kl_term, load_teacher, register_objective


@register_objective
class RST(TRADES):
    """Robust self-training (Carmon, Raghunathan, Schmidt, Liang & Duchi, "Unlabeled Data Improves
    Adversarial Robustness", NeurIPS 2019): a standard model (``teacher``, trained on the labeled
    data) labels the unlabeled images once; then TRADES trains on batches mixing labeled and
    pseudo-labeled images (``--unlabeled-fraction``, 0.5 as in the paper).

    Published (CIFAR-10 + 500K Tiny Images): TRADES with beta 6, 10 steps of 0.007 at Linf eps
    8/255, half of each batch unlabeled. ``teacher``: an ``nn.Module`` (Python) or a checkpoint path
    (``X.safetensors`` with its card; CLI ``rst:teacher=PATH``).
    """

    name = "rst"
    defaults = {**TRADES.defaults, "teacher": ""}
    uses_unlabeled = True

    def __init__(self, threat: ThreatModel | None = None, teacher: Any = None, **params: Any) -> None:
        self.teacher, described = load_teacher(self.name, teacher)
        super().__init__(threat, teacher=described, **params)

    def label_unlabeled(self, x: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 512) -> torch.Tensor:
        """The teacher's predicted classes (argmax of its logits) for ``x``, in batches, eval mode."""
        self.teacher.to(device)
        out = []
        with eval_mode(self.teacher), torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                out.append(self.teacher(x[start : start + batch_size].to(device)).argmax(dim=1).cpu())
        return torch.cat(out).long()


@register_objective
class UAT(TRADES):
    """Unsupervised adversarial training with online targets, UAT-OT (Alayrac, Uesato, Huang, Fawzi,
    Stanforth & Kohli, "Are Labels Required for Improving Adversarial Robustness?", NeurIPS 2019):
    cross-entropy on the labeled images plus ``lambda * KL(p(x) || p(x_adv))`` on the unlabeled ones
    (label -1), where the clean prediction ``p(x)`` of the current model is a fixed target (no
    gradient flows through it) and ``x_adv`` maximizes the KL inside the threat model (the TRADES
    inner maximization: ``steps`` steps of ``alpha``, default 2.5 eps / steps, from x + 0.001 N(0, 1)).

    Published: lambda 1 (equal weight of the supervised and the unsupervised term), Linf eps 8/255 on
    CIFAR-10. Without unlabeled images in a batch the consistency term is 0; without labeled ones,
    the cross-entropy.
    """

    name = "uat"
    defaults = {"lambda": 1.0, "steps": 10, "alpha": None, "eps_warmup": 0.0}
    uses_unlabeled = True

    def validate(self) -> None:
        super().validate()
        if not self.params["lambda"] >= 0:
            raise RobustlabError(f"recipe {self.name!r}: lambda must be >= 0, got {self.params['lambda']}")

    def perturb(self, model, x, y, generator=None):
        """The batch with its unlabeled images (label -1) replaced by their KL-maximizing points."""
        unl = y < 0
        x_adv = x.detach().clone()
        if bool(unl.any()):
            x_adv[unl] = super().perturb(model, x[unl], y[unl], generator)
        return x_adv

    def loss(self, model, x, y, generator):
        unl = y < 0
        lab = ~unl
        x_adv = self.perturb(model, x, y, generator)
        logits = model(x)
        zero = logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        ce = F.cross_entropy(logits[lab], y[lab]) if bool(lab.any()) else zero
        if bool(lab.any()):
            logs["clean_acc"] = _accuracy(logits[lab], y[lab])
        kl = zero
        if bool(unl.any()):
            target = F.softmax(logits[unl].detach().float(), dim=1)
            logits_adv = model(x_adv[unl])
            kl = kl_term(logits_adv, target)
            logs["consistency"] = (logits_adv.detach().argmax(dim=1) == target.argmax(dim=1)).float().mean()
        logs.update(ce=ce.detach(), kl=kl.detach())
        return ce + self.params["lambda"] * kl, logs
