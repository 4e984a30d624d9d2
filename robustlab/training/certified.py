"""Certified training recipes: IBP (Gowal et al., "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models", 2018) and CROWN-IBP (Zhang et al., "Towards
Stable and Efficient Training of Verifiably Robust Neural Networks", ICLR 2020).

Both minimize ``kappa * CE(z(x), y) + (1 - kappa) * CE(-m, y)``, where ``m[j]`` is a verified lower
bound of the margin ``z_y - z_j`` over the ball of the current epsilon (``-m`` are the worst-case
logits, 0 for the true class). Epsilon grows linearly from 0 to the threat model's over the fractions
``ramp_start`` .. ``ramp_end`` of the run (clean training before), and kappa moves linearly from
``kappa_start`` to ``kappa_end`` over the same ramp. CROWN-IBP's margin is
``(1 - beta) * m_IBP + beta * m_CROWN-IBP`` with beta moving from ``beta_start`` to ``beta_end`` over
the ramp. The model must be a chain the bounds support (``robustlab.certify.ibp``), without
BatchNorm or dropout (in training mode their outputs depend on the batch or on draws).

Published MNIST settings: Gowal et al. train at a larger epsilon than they test (0.4 for 0.3, 0.2
for 0.1); their reference code (google-deepmind/interval-bound-propagation, examples/train.py) runs
60k steps of batch 100 with 2k clean steps and a 10k-step ramp (fractions 0.033 .. 0.2), Adam 1e-3
(1e-4 from step 15k, 1e-5 from 25k), kappa 1 -> 0.5. Zhang et al.'s code (huanzhang12/CROWN-IBP,
config/mnist_dm-large_0.4.json): 200 epochs of batch 256, Adam 5e-4 (/10 at epochs 130 and 190),
the ramp over epochs 10-61 (fractions 0.05 .. 0.3), beta 1 -> 0, final kappa 0.5 by default (the
paper also trains with kappa ending at 0). The defaults here: the ramp fractions 0.05 .. 0.3, kappa
1 -> 0.5 (kappa ending at 0 cost a short CPU run most of its clean accuracy, see
benchmarks/results/ibp_mnist*.txt). Short runs want a ramp that ends well before the run does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.certify.ibp import margin_bounds, worst_margin
from robustlab.errors import RobustlabError
from robustlab.training.objectives import Objective, _accuracy, register_objective
from robustlab.training.schedules import linear_ramp


class BoundTraining(Objective):
    """The shared loss of the bound-based recipes; subclasses give the margin bound."""

    defaults = {"ramp_start": 0.05, "ramp_end": 0.3, "kappa_start": 1.0, "kappa_end": 0.5}

    def validate(self) -> None:
        super().validate()
        p = self.params
        if self.threat.norm not in ("linf", "l2"):
            raise RobustlabError(f"recipe {self.name!r} trains against linf or l2 balls, not {self.threat.norm}")
        if not 0.0 <= p["ramp_start"] <= p["ramp_end"] <= 1.0:
            raise RobustlabError(f"recipe {self.name!r}: need 0 <= ramp_start <= ramp_end <= 1 (fractions of the run)")
        for key in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            if key in p and not 0.0 <= p[key] <= 1.0:
                raise RobustlabError(f"recipe {self.name!r}: {key} must be in [0, 1], got {p[key]}")

    def schedule(self) -> float:
        """Fraction of the epsilon ramp done at the current point of the run."""
        p = self.params
        return linear_ramp(self.progress, p["ramp_start"], p["ramp_end"])

    def current_eps(self) -> float:
        return self.threat.eps * self.schedule()

    def _between(self, key: str) -> float:
        r = self.schedule()
        return (1 - r) * self.params[f"{key}_start"] + r * self.params[f"{key}_end"]

    def margins(self, model, x, y, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, x, y, generator):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        kappa, eps = self._between("kappa"), self.current_eps()
        logs = {"clean_acc": _accuracy(logits, y), "eps": torch.tensor(eps), "kappa": torch.tensor(kappa)}
        if kappa >= 1.0:  # clean warm-up: the bound term has no weight
            return ce, logs
        margin = self.margins(model, x, y, eps)
        robust = F.cross_entropy(-margin, y)
        logs.update(bound_loss=robust.detach(), verified_acc=(worst_margin(margin.detach(), y) > 0).float().mean())
        return kappa * ce + (1 - kappa) * robust, logs


@register_objective
class IBPTraining(BoundTraining):
    """IBP certified training (Gowal et al. 2018): the margin bound by interval propagation with
    the last layer elided. Parameters: ``ramp_start``/``ramp_end`` (fractions of the run over which
    epsilon grows from 0), ``kappa_start``/``kappa_end`` (weight of the clean loss over the ramp)."""

    name = "ibp"

    def margins(self, model, x, y, eps):
        return margin_bounds(model, x, y, eps, self.threat.norm, "ibp")


@register_objective
class CROWNIBPTraining(BoundTraining):
    """CROWN-IBP certified training (Zhang et al. 2020): the margin bound mixes CROWN-IBP and IBP,
    ``beta`` (from ``beta_start`` to ``beta_end`` over the ramp) weighing CROWN-IBP; the other
    parameters are IBP's."""

    name = "crown-ibp"
    defaults = {"ramp_start": 0.05, "ramp_end": 0.3, "kappa_start": 1.0, "kappa_end": 0.5,
                "beta_start": 1.0, "beta_end": 0.0}

    def margins(self, model, x, y, eps):
        beta = self._between("beta")
        norm = self.threat.norm
        ibp = margin_bounds(model, x, y, eps, norm, "ibp") if beta < 1.0 else 0.0
        crown = margin_bounds(model, x, y, eps, norm, "crown-ibp") if beta > 0.0 else 0.0
        return (1 - beta) * ibp + beta * crown
