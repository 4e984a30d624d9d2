"""NES (Ilyas et al. 2018, "Black-box adversarial attacks with limited queries and information"):
natural-evolution-strategies gradient estimates from antithetic Gaussian queries, followed by
PGD-style steepest-ascent steps. Score-based; shares its loop with SPSA (see
:mod:`robustlab.attacks.spsa`)."""

from __future__ import annotations

import torch

from robustlab.attacks.base import register_attack
from robustlab.attacks.spsa import ScoreBasedAttack
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES


@register_attack
class NES(ScoreBasedAttack):
    """NES gradient estimation with projected sign (Linf) or normalized (L2) steps.

    steps: iterations; samples: antithetic Gaussian pairs per step (each step costs
    ``2 * samples + 1`` queries per sample); sigma: standard deviation of the query noise (pixels);
    alpha: step size in the threat model's norm (default ``eps / 10``: an estimated gradient is
    noisy, and a query-limited attack cannot afford PGD's tiny steps); momentum: weight of the
    previous (averaged) estimate in the one used for the step (0 disables); loss: the maximized
    objective (``cw`` margin by default); random_start: start at a random point of the ball.
    """

    name = "nes"
    norms = ("linf", "l2")
    gaussian = True
    defaults = {
        "steps": 100, "samples": 50, "sigma": 0.001, "alpha": None, "momentum": 0.0, "loss": "cw",
        "random_start": False,
    }
    choices = {"loss": tuple(LOSSES)}

    def validate(self) -> None:
        super().validate()
        p = self.params
        if not p["sigma"] > 0:
            raise RobustlabError(f"attack {self.name!r}: sigma must be > 0, got {p['sigma']}")
        if p["alpha"] is not None and not (isinstance(p["alpha"], float) and p["alpha"] > 0):
            raise RobustlabError(f"attack {self.name!r}: alpha must be a number > 0, got {p['alpha']!r}")
        if not 0.0 <= p["momentum"] < 1.0:
            raise RobustlabError(f"attack {self.name!r}: momentum must be in [0, 1), got {p['momentum']}")

    def spread(self) -> float:
        return float(self.params["sigma"])

    def step_size(self) -> float:
        alpha = self.params["alpha"]
        return float(alpha) if alpha is not None else self.threat.eps / 10

    def _init_state(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"g": torch.zeros_like(x0)} if self.params["momentum"] else {}

    def _step(self, x_cur, x0, grad, state, t):
        mu = self.params["momentum"]
        if mu:
            state["g"].mul_(mu).add_(grad, alpha=1 - mu)
            grad = state["g"]
        step = self.threat.steepest_step(grad, self.step_size(), x_cur)
        return self.threat.project(x_cur + step, x0)
