"""Universal adversarial perturbations: one perturbation for a whole data set, the SGD variant of
Shafahi, Najibi, Xu, Dickerson, Davis & Goldstein 2020 ("Universal adversarial training"; the
problem of Moosavi-Dezfooli et al. 2017).

``uap`` maximizes the mean of the clipped cross-entropy ``min(CE, clip_loss)`` of ``clip(x + delta)``
over the images, by steepest ascent in the threat model's norm (Linf: signed gradient) on
minibatches of ``batch_size`` images drawn in a random order each epoch, projecting ``delta`` back
onto the ball after every step. Clipping the loss keeps images that are already fooled from
dominating the gradient. It stops early once a fraction ``target_fooling`` of the images is fooled
(checked after each epoch; 1: all of them).

``run(model, x, y)`` fits one perturbation on the batch and returns it applied to every image (in
``AttackResult.params``, the perturbation, once per sample); :meth:`UniversalSGD.fit` gives the
perturbation itself, e.g. fitted on training images and evaluated on test images
(:func:`robustlab.eval.structured.evaluate_universal`). Costs per image: one gradient each time
it is in a minibatch, and one forward per check.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError


@register_attack
class UniversalSGD(Attack):
    """Universal perturbation by minibatch steepest ascent (Linf, L2).

    epochs: passes over the images; batch_size: images per step; alpha: step size (default eps/10);
    clip_loss: cap on each image's cross-entropy; target_fooling: stop once this fraction of the
    images is fooled.
    """

    name = "uap"
    norms = ("universal",)
    defaults = {"epochs": 10, "batch_size": 32, "alpha": None, "clip_loss": 5.0, "target_fooling": 1.0}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("epochs", "batch_size"):
            if p[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {p[key]}")
        if not 0 < p["target_fooling"] <= 1:
            raise RobustlabError(f"attack {self.name!r}: target_fooling must be in (0, 1], got {p['target_fooling']}")
        if p["alpha"] is not None and not p["alpha"] > 0:
            raise RobustlabError(f"attack {self.name!r}: alpha must be > 0, got {p['alpha']}")
        if self.threat.base_norm not in ("linf", "l2"):
            raise RobustlabError(f"attack {self.name!r} supports universal linf and l2, not {self.threat.base_norm}")

    def _fooled(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([
                self.is_success(check_logits(model(self.threat.apply(x[i : i + 500], delta)), len(y[i : i + 500])),
                                y[i : i + 500])
                for i in range(0, len(y), 500)
            ])

    def fit(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The universal perturbation (C, H, W) for the images ``x``; also per image the gradients
        and forwards spent, and whether the perturbation fools it. ``model`` must be in eval mode
        (``run`` sees to it)."""
        p = self.params
        threat = self.threat
        step_threat = threat.delta_ball
        alpha = p["alpha"] if p["alpha"] is not None else threat.eps / 10
        n = x.shape[0]
        grads = torch.zeros(n, dtype=torch.long, device=x.device)
        fwds = torch.zeros(n, dtype=torch.long, device=x.device)
        delta = torch.zeros_like(x[0])
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(p["epochs"]):
            order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
            for i in range(0, n, p["batch_size"]):
                idx = order[i : i + p["batch_size"]]
                d = delta.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = check_logits(model(threat.apply(x[idx], d)), len(idx))
                    loss = F.cross_entropy(logits, y[idx], reduction="none").clamp(max=p["clip_loss"]).mean()
                    (g,) = torch.autograd.grad(-loss if self.targeted else loss, d)
                grads[idx] += 1
                fwds[idx] += 1
                delta = step_threat.steepest_step(g.unsqueeze(0), alpha).squeeze(0) + delta
                delta = threat.project_delta(delta)
            fwds += 1
            fooled = self._fooled(model, x, y, delta)
            if float(fooled.float().mean()) >= p["target_fooling"]:
                break
        return delta.detach(), grads, fwds, fooled

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        delta, grads, fwds, fooled = self.fit(model, x, y, generator)
        return AttackResult(self.threat.apply(x, delta), fooled, grads, fwds,
                            params=delta.unsqueeze(0).expand_as(x).clone())
