"""The Max-Mahalanobis-center (MMC) training recipe (Pang et al., ICLR 2020): ``||z - mu_y||^2 / 2``,
the squared distance of the network's features to its class's center, on a model with the MMC head
(``create_model(..., head="mmc:C")``, :mod:`robustlab.models.mmc`), whose output
``-||z - mu_k||^2`` makes the loss ``-logit_y / 2``. ``robustlab train --recipe mmc:radius=C`` builds
the model with that head."""

from __future__ import annotations

from typing import Any

from robustlab.errors import RobustlabError
from robustlab.models.mmc import MMCHead
from robustlab.training.objectives import Objective, _accuracy, register_objective


@register_objective
class MMC(Objective):
    """MMC loss on the clean batch; ``radius`` is the centers' C (the model option it needs)."""

    name = "mmc"
    adversarial = False
    defaults = {"radius": 10.0}

    def validate(self) -> None:
        if not self.params["radius"] > 0:
            raise RobustlabError(f"recipe 'mmc': radius must be > 0, got {self.params['radius']}")

    def model_options(self) -> dict[str, Any]:
        """The architecture option the recipe trains: the MMC head with this radius."""
        return {"head": f"mmc:{self.params['radius']:g}"}

    def loss(self, model, x, y, generator):
        heads = [m for m in model.modules() if isinstance(m, MMCHead)]
        if not heads:
            raise RobustlabError("recipe 'mmc' trains a model with the MMC head: build it with head='mmc:C'")
        logits = model(x)  # -||z - mu_k||^2
        loss = -logits.gather(1, y[:, None]).mean() / 2
        return loss, {"clean_acc": _accuracy(logits, y)}
