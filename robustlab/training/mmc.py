"""The Max-Mahalanobis-center (MMC) training recipes (Pang et al., ICLR 2020): ``||z - mu_y||^2 / 2``,
the squared distance of the network's features to its class's center, on a model with the MMC head
(``create_model(..., head="mmc:C")``, :mod:`robustlab.models.mmc`), whose output
``-||z - mu_k||^2`` makes the loss ``-logit_y / 2``. ``robustlab train --recipe mmc:radius=C`` builds
the model with that head.

``mmc-at`` is MMC with adversarial training, as the paper pairs them: the MMC loss at PGD examples
that maximize the MMC loss itself. Cross-entropy on the MMC head's output saturates (logit gaps of
order ``C^2``, 222 at C = 10, underflow the softmax, so its gradient is exactly zero at well-fitted
points), so neither the inner maximization nor the attacks that evaluate the model may use it.
"""

from __future__ import annotations

from typing import Any

import torch

from robustlab.errors import RobustlabError
from robustlab.models.mmc import MMCHead
from robustlab.training import inner
from robustlab.training.objectives import Objective, _accuracy, register_objective


def _mmc_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample ``||z - mu_y||^2 / 2`` from the MMC head's output ``-||z - mu_k||^2``."""
    return -logits.float().gather(1, y[:, None]).squeeze(1) / 2


def _check_head(model) -> None:
    if not any(isinstance(m, MMCHead) for m in model.modules()):
        raise RobustlabError("recipe 'mmc' trains a model with the MMC head: build it with head='mmc:C'")


@register_objective
class MMC(Objective):
    """MMC loss on the clean batch; ``radius`` is the centers' C (the model option it needs)."""

    name = "mmc"
    adversarial = False
    defaults = {"radius": 10.0}

    def validate(self) -> None:
        super().validate()
        if not self.params["radius"] > 0:
            raise RobustlabError(f"recipe {self.name!r}: radius must be > 0, got {self.params['radius']}")

    def model_options(self) -> dict[str, Any]:
        """The architecture option the recipe trains: the MMC head with this radius."""
        return {"head": f"mmc:{self.params['radius']:g}"}

    def declared_defenses(self) -> list[str]:
        """What the trained model's card declares, so its evaluation is adaptive: cross-entropy on the
        MMC head saturates, so attacks take the DLR margin (:mod:`robustlab.defenses.margin`)."""
        return ["margin-loss"]

    def loss(self, model, x, y, generator):
        _check_head(model)
        x_train = self.perturb(model, x, y, generator)
        logits = model(x if x_train is None else x_train)  # -||z - mu_k||^2
        return _mmc_loss(logits, y).mean(), {("adv_acc" if self.adversarial else "clean_acc"): _accuracy(logits, y)}


@register_objective
class MMCAT(MMC):
    """MMC with PGD adversarial training: the MMC loss at the point ``steps`` steps of size ``alpha``
    (default ``2.5 * eps / steps``) of projected ascent on the MMC loss reach from a uniform random
    start in the ball (``random_start``); ``eps_warmup``: epsilon (and alpha) grow linearly over this
    fraction of the run."""

    name = "mmc-at"
    adversarial = True
    defaults = {"radius": 10.0, "steps": 10, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        return inner.maximize(model, x, lambda logits: _mmc_loss(logits, y), self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "uniform" if p["random_start"] else "none", generator)
