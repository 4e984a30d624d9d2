"""Transfer attacks: craft on a surrogate model, judge on the target.

``transfer`` loads a surrogate (any model spec :func:`robustlab.models.load_model` accepts: a
registry name, a checkpoint path, or ``file.py:function``), runs a registered white-box attack on it
(MI-FGSM by default: Dong et al. 2018) and sends each adversarial image once to the target model.
With ``diverse_input > 0`` the surrogate sees a randomly resized and padded copy of the input before
every forward pass (DI-FGSM: Xie et al. 2019, "Improving transferability of adversarial examples with
input diversity"); the transformation lives in a wrapper around the surrogate, so any white-box attack
runs on it unchanged.

Costs: ``gradients`` counts the input gradients taken on the *surrogate* (the target is never
differentiated); ``forwards`` counts the queries to the *target* (one per sample).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks.base import ATTACKS, Attack, AttackResult, create_attack, register_attack
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES
from robustlab.models.runtime import fast_runtime


def _never_broken(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(labels), dtype=torch.bool, device=logits.device)


class DiverseInput(nn.Module):
    """``model`` behind the DI transformation: with probability ``p`` per forward pass, the batch is
    resized (nearest neighbour) to a random side ``r`` in ``[ceil(resize_rate * H), H]`` and zero-padded
    back to ``H x W`` at a random offset, so the model always sees its own input size. One draw per
    forward pass (for the whole batch, as in the paper), from ``generator``."""

    def __init__(
        self, model: nn.Module, p: float, resize_rate: float = 0.9, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.p = float(p)
        self.resize_rate = float(resize_rate)
        self.generator = generator

    def _randint(self, high: int, device: torch.device) -> int:
        """A random integer in [0, high), from the generator."""
        where = self.generator.device if self.generator is not None else device
        return int(torch.randint(0, high, (1,), generator=self.generator, device=where))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The randomly resized and padded batch (or ``x`` itself, with probability ``1 - p``)."""
        if self.p <= 0:
            return x
        where = self.generator.device if self.generator is not None else x.device
        if float(torch.rand(1, generator=self.generator, device=where)) >= self.p:
            return x
        h, w = x.shape[-2:]
        smallest = min(h, max(1, math.ceil(self.resize_rate * h)))
        rh = smallest + self._randint(h - smallest + 1, x.device)
        rw = min(w, max(1, round(w * rh / h)))  # same scale for both sides
        resized = F.interpolate(x, size=(rh, rw), mode="nearest")
        top, left = self._randint(h - rh + 1, x.device), self._randint(w - rw + 1, x.device)
        return F.pad(resized, (left, w - rw - left, top, h - rh - top))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(x))


@register_attack
class Transfer(Attack):
    """Transfer attack from a surrogate model.

    surrogate: model spec of the surrogate (required); base: the white-box attack run on it (a
    registered name, ``mifgsm`` by default); steps, alpha (None: the base attack's default), loss: passed
    to the base attack; momentum: MI-FGSM's decay (passed as ``decay`` when the base attack has it);
    diverse_input: probability of the DI transformation per forward pass (0 disables);
    resize_rate: smallest DI resize as a fraction of the side; eot: gradient draws averaged per step,
    passed when the base attack has an ``eot`` parameter.

    The base attack runs for all its steps on the surrogate: fooling the surrogate is not a reason
    to stop, since a larger surrogate margin transfers better. The surrogate is loaded once per
    attack object, on first use, and must predict the same number of classes as the target.
    """

    name = "transfer"
    kind = "transfer"
    defaults = {
        "surrogate": None, "base": "mifgsm", "steps": 10, "alpha": None, "loss": "ce", "momentum": 1.0,
        "diverse_input": 0.5, "resize_rate": 0.9, "eot": 1,
    }
    choices = {"loss": tuple(LOSSES)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._surrogate: nn.Module | None = None
        self._surrogate_device: torch.device | None = None

    def validate(self) -> None:
        super().validate()
        p = self.params
        if not isinstance(p["surrogate"], str) or not p["surrogate"].strip():
            raise RobustlabError(
                f"attack {self.name!r} needs surrogate=<model spec> (a checkpoint, file.py:function or a "
                "registry name) to craft the examples on"
            )
        if p["base"] not in ATTACKS or ATTACKS.get(p["base"]).kind != "white-box":
            white = ", ".join(n for n in ATTACKS.names() if ATTACKS.get(n).kind == "white-box")
            raise RobustlabError(f"attack {self.name!r}: base={p['base']!r} is not a white-box attack; use one of {white}")
        if not 0.0 <= p["diverse_input"] <= 1.0:
            raise RobustlabError(f"attack {self.name!r}: diverse_input must be in [0, 1], got {p['diverse_input']}")
        if not 0.0 < p["resize_rate"] <= 1.0:
            raise RobustlabError(f"attack {self.name!r}: resize_rate must be in (0, 1], got {p['resize_rate']}")
        if p["momentum"] < 0:
            raise RobustlabError(f"attack {self.name!r}: momentum must be >= 0, got {p['momentum']}")
        if p["eot"] < 1:
            raise RobustlabError(f"attack {self.name!r}: eot must be >= 1, got {p['eot']}")
        self.base_attack()  # the base attack must accept the parameters passed on

    def base_attack(self) -> Attack:
        """The white-box attack run on the surrogate, built from this attack's parameters."""
        p = self.params
        cls = ATTACKS.get(p["base"])
        passed: dict[str, Any] = {}
        for key in ("steps", "alpha", "loss"):
            if key in cls.defaults and p[key] is not None:
                passed[key] = p[key]
        if "decay" in cls.defaults:
            passed["decay"] = p["momentum"]
        if "eot" in cls.defaults:
            passed["eot"] = p["eot"]
        elif p["eot"] > 1:
            raise RobustlabError(f"attack {self.name!r}: base={p['base']!r} has no eot parameter")
        return create_attack(p["base"], self.threat, targeted=self.targeted, **passed)

    def surrogate(self, device: torch.device | str = "cpu") -> nn.Module:
        """The surrogate model on ``device``, loaded on first use and cached on this attack object."""
        device = torch.device(device)
        if self._surrogate is None:
            from robustlab.models.loading import load_model

            self._surrogate = load_model(self.params["surrogate"], device=device).model.eval()
            self._surrogate_device = device
        elif self._surrogate_device != device:
            self._surrogate = self._surrogate.to(device)
            self._surrogate_device = device
        return self._surrogate

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        crafted = DiverseInput(self.surrogate(x.device), p["diverse_input"], p["resize_rate"], generator)
        with torch.no_grad():
            surrogate_classes = self.logits(crafted.model, x[:1]).shape[1]
        base = self.base_attack()
        # Run every step on the surrogate: the base loop sees no sample as broken, so none stops early.
        base.is_success = _never_broken  # type: ignore[method-assign]
        # The surrogate is this attack's own model, so the speed context for it is the attack's
        # business (the caller's fast_runtime covers the target only); no random draw is spent on it.
        with fast_runtime(crafted.model, x):
            result = base.run(crafted, x, y, generator)
        x_adv = self.threat.project(result.x_adv, x)
        logits = self.logits(model, x_adv)
        if surrogate_classes != logits.shape[1]:
            raise RobustlabError(
                f"attack {self.name!r}: the surrogate predicts {surrogate_classes} classes, the target "
                f"{logits.shape[1]}"
            )
        success = self.is_success(logits, y)
        return AttackResult(x_adv, success, result.gradients, torch.ones_like(result.forwards))
