"""Iterative gradient attacks on one loop: PGD (Madry et al. 2018), BIM (Kurakin et al. 2017) and
MI-FGSM (Dong et al. 2018), in Linf, L2 and L1 (the sparse L1 step of SLIDE).

The loop keeps each sample's first successful iterate and drops the sample from the batch at once,
so no compute is spent on samples already misclassified; restarts only re-attack the survivors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES


@register_attack
class PGD(Attack):
    """Projected gradient ascent on a per-sample loss.

    steps: iterations per restart; alpha: step size in the threat model's norm (default
    ``2.5 * eps / steps``); restarts: number of runs, each from a new random start and only on
    samples not yet broken; random_start: start at a random point of the ball (uniform in the cube for
    Linf; uniform direction and radius for L2 and L1); loss: ``ce``, ``cw`` or
    ``dlr``; l1_sparsity: for L1, the fraction of coordinates left out of each step; eot: gradients
    averaged per step over this many forward/backward passes (expectation over transformation, for
    randomized models and defenses; each step then costs ``eot`` gradients).
    """

    name = "pgd"
    defaults = {"steps": 10, "alpha": None, "restarts": 1, "random_start": True, "loss": "ce", "l1_sparsity": 0.95,
                "eot": 1}
    choices = {"loss": tuple(LOSSES)}
    norm_params = {"l1_sparsity": ("l1",)}
    dense = True
    decay = 0.0  # momentum on the L1-normalized gradient (MI-FGSM); 0 for plain PGD

    def validate(self) -> None:
        super().validate()
        alpha = self.params["alpha"]
        if alpha is not None and not (isinstance(alpha, float) and alpha > 0):
            raise RobustlabError(f"attack {self.name!r}: alpha must be a number > 0, got {alpha!r}")
        if not 0.0 <= self.params["l1_sparsity"] < 1.0:
            raise RobustlabError(f"attack {self.name!r}: l1_sparsity must be in [0, 1)")
        if self.params["eot"] < 1:
            raise RobustlabError(f"attack {self.name!r}: eot must be >= 1, got {self.params['eot']}")

    def step_size(self) -> float:
        alpha = self.params["alpha"]
        return float(alpha) if alpha is not None else 2.5 * self.threat.eps / self.params["steps"]

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        found = Active(x)
        alpha = self.step_size()
        for _ in range(p["restarts"]):
            if not found.restart():
                break
            x0, y0 = x[found.pos], y[found.pos]
            # Random start: uniform radius (a volume-uniform L2/L1 start sits on the sphere and is weaker).
            x_cur = self.threat.random_init(x0, generator, radius="uniform") if p["random_start"] else x0.clone()
            momentum = torch.zeros_like(x0) if self.decay else None
            for _step in range(p["steps"]):
                logits, g = self.loss_and_grad(model, x_cur, y0, p["loss"], p["eot"])
                found.spend(gradients=p["eot"], forwards=p["eot"])
                if found.retire(self.is_success(logits, y0), x_cur):
                    x0, y0, x_cur, g, momentum = found.kept(x0, y0, x_cur, g, momentum)
                    if not found:
                        break
                if momentum is not None:
                    l1 = g.flatten(1).abs().sum(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
                    momentum = self.decay * momentum + g / l1
                    g = momentum
                step = self.threat.steepest_step(g, alpha, x_cur, p["l1_sparsity"])
                x_cur = self.threat.project(x_cur + step, x0)
            if not found:
                break
            # The last iterate has not been evaluated yet.
            done = self.is_success(self.logits(model, x_cur), y0)
            found.spend(forwards=1)
            found.close(x_cur, success=done)
        return found.result()


@register_attack
class BIM(PGD):
    """Basic iterative method: PGD from the clean image with step ``eps / steps`` by default."""

    name = "bim"
    defaults = {**PGD.defaults, "random_start": False}

    def step_size(self) -> float:
        alpha = self.params["alpha"]
        return float(alpha) if alpha is not None else self.threat.eps / self.params["steps"]


@register_attack
class MIFGSM(BIM):
    """Momentum iterative FGSM: the step follows a decayed sum of L1-normalized gradients."""

    name = "mifgsm"
    defaults = {**BIM.defaults, "decay": 1.0}

    @property
    def decay(self) -> float:  # type: ignore[override]
        return self.params["decay"]

    def validate(self) -> None:
        super().validate()
        if self.params["decay"] < 0:
            raise RobustlabError(f"attack {self.name!r}: decay must be >= 0")


@register_attack
class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps along the steepest
    ascent direction of the norm (sign for Linf, normalized gradient for L2, sparse for L1); eot: the
    gradient averaged over this many passes (randomized models and defenses)."""

    name = "fgsm"
    defaults = {"loss": "ce", "l1_sparsity": 0.95, "eot": 1}
    dense = True
    choices = {"loss": tuple(LOSSES)}
    norm_params = {"l1_sparsity": ("l1",)}

    def validate(self) -> None:
        super().validate()
        if self.params["eot"] < 1:
            raise RobustlabError(f"attack {self.name!r}: eot must be >= 1, got {self.params['eot']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        eot = self.params["eot"]
        _, g = self.loss_and_grad(model, x, y, self.params["loss"], eot)
        step = self.threat.steepest_step(g, self.threat.eps, x, self.params["l1_sparsity"])
        x_adv = self.threat.project(x + step, x)
        success = self.is_success(self.logits(model, x_adv), y)
        ones = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        return AttackResult(x_adv, success, eot * ones, (eot + 1) * ones)
