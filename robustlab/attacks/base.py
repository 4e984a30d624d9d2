"""The attack contract: a stable name, JSON parameters, a threat model, targeted or not.

``attack.run(model, x, y, generator)`` returns an :class:`AttackResult` with the adversarial batch
(always inside the threat model), per-sample success, and per-sample counts of input gradients and
forward passes spent. Attacks never change the model's mode or parameters: they run it in eval mode,
restore the caller's modes afterwards, and differentiate with respect to the input only (no
parameter gradient is computed or accumulated). They run the model in the memory layout and with
the weights it has: the speed context (channels-last, subnormal weights read as zero) is the
caller's, :func:`robustlab.models.runtime.fast_runtime`, which the evaluation runner and the CLI apply
to a whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from robustlab.checks import check_images, check_labels, check_logits
from robustlab.data.dense import check_dense_labels
from robustlab.errors import RobustlabError
from robustlab.losses import get_loss
from robustlab.models.runtime import eval_mode
from robustlab.params import Configurable
from robustlab.registry import Registry
from robustlab.threat import NORMS, ThreatModel


@dataclass
class AttackResult:
    """What an attack returns for a batch of N samples.

    x_adv: (N, C, H, W) adversarial images, inside the threat model.
    success: (N,) bool, misclassified (untargeted) or classified as the target (targeted) by the
      attack's own last forward pass on ``x_adv``; the evaluation runner re-verifies it.
    gradients: (N,) int64, input-gradient evaluations spent on each sample.
    forwards: (N,) int64, forward passes (model queries) spent on each sample, gradient steps included.
    params: for threat models whose membership the images alone do not show (see
      :mod:`robustlab.threat_kinds`), per sample what places the point in it (spatial: angle, dx,
      dy; universal: the one perturbation); None otherwise.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    gradients: torch.Tensor
    forwards: torch.Tensor
    params: torch.Tensor | None = None


class Attack(Configurable):
    """Base class. Subclasses set ``name`` and ``defaults`` and implement ``_attack``; parameters are
    handled by :class:`robustlab.params.Configurable` (errors name the ``attack``).

    ``defaults`` maps every parameter name to its default (JSON values only); ``None`` means "derived
    from the threat model" (for example a step size). ``norms`` lists the supported norms.

    ``kind`` says what the attacker sees: ``white-box`` (gradients), ``transfer`` (a surrogate model),
    ``score-based`` (output scores only) or ``decision-based`` (the predicted label only); reports label
    results by it. A ``minimum_norm`` attack looks for the smallest misclassifying perturbation and may
    return points outside the ball (never outside the box): the evaluation records the distance it
    found and counts a success only inside the ball.
    """

    component: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = NORMS
    # Parameters that apply under some norms only (name -> those norms), e.g. l1_sparsity: ("l1",).
    norm_params: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Parameters whose None stands for a value derived from others (name -> the method giving it).
    derived: ClassVar[dict[str, str]] = {"alpha": "step_size"}
    kind: ClassVar[str] = "white-box"
    minimum_norm: ClassVar[bool] = False
    # attacks built for one defense: the DefendedModel method that hands over (that defense, the network
    # behind it), and what it is, for the error line (see runs_on, defense_of)
    defense_accessor: ClassVar[str | None] = None
    defense_needed: ClassVar[str] = ""
    # Attacks segmentation models too (per-pixel labels (N, H, W), dense logits): the loss is the
    # mean over pixels (robustlab.losses.per_sample) and a sample counts as broken only when every
    # pixel is, so the attack runs all its steps.
    dense: ClassVar[bool] = False

    def __init__(self, threat: ThreatModel, targeted: bool = False, **params: Any) -> None:
        if threat.norm not in self.norms:
            raise RobustlabError(f"attack {self.name!r} supports norms {', '.join(self.norms)}, not {threat.norm}")
        self.threat = threat
        self.targeted = bool(targeted)
        super().__init__(**params)

    # ------------------------------------------------------------------ public

    def validate(self) -> None:
        """Check parameter values; raise RobustlabError with a clear message. Override to add checks."""
        for key in ("steps", "restarts"):
            if key in self.params and self.params[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {self.params[key]}")

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this attack: JSON-serializable (the results store hashes it)."""
        return {**super().config(), "threat": self.threat.to_dict(), "targeted": self.targeted, "kind": self.kind}

    def rebuild(self, **params: Any) -> "Attack":
        """This attack with these parameters (same threat model and targeting)."""
        return type(self)(self.threat, targeted=self.targeted, **params)

    def shown_params(self) -> dict[str, Any]:
        """The parameters as reports show them. The rule: a parameter that does not apply under this
        threat model's norm (``norm_params``) is left out; a None that stands for a derived value
        (``derived``, e.g. ``alpha`` from ``step_size()``) is shown as that value (4 significant
        digits); any other None (the attack's own choice, e.g. a default layer) is left out."""
        out: dict[str, Any] = {}
        for key, value in self.params.items():
            if self.threat.norm not in self.norm_params.get(key, (self.threat.norm,)):
                continue
            if value is None:
                method = getattr(self, self.derived.get(key, ""), None)
                if not callable(method):
                    continue
                value = float(f"{float(method()):.4g}")
            out[key] = value
        return out

    @classmethod
    def runs_on(cls, model: nn.Module) -> bool:
        """Whether this attack can attack ``model`` at all: an attack built for one defense needs the model
        to hand that defense over (see :attr:`defense_accessor`)."""
        return cls.defense_accessor is None or cls._reach(model) is not None

    @classmethod
    def _reach(cls, model: nn.Module) -> tuple[Any, nn.Module] | None:
        get = getattr(model, cls.defense_accessor, None)
        return get() if callable(get) else None

    def defense_of(self, model: nn.Module) -> tuple[Any, nn.Module]:
        """(the defense this attack is built for, the network behind it), or one error line saying what
        the attack needs."""
        found = self._reach(model)
        if found is None:
            raise RobustlabError(f"attack {self.name!r} attacks a model behind {self.defense_needed}; this model has none")
        return found

    def with_loss(self, loss: str) -> "Attack":
        """This attack maximizing ``loss`` (a name of :data:`robustlab.losses.LOSSES`) where it maximizes
        cross-entropy (a ``loss`` parameter at ``ce``); itself otherwise. For models whose logits
        saturate the softmax, so that cross-entropy has no gradient (the MMC head)."""
        return self.with_params(loss=loss) if self.params.get("loss") == "ce" else self

    def with_threat(self, threat: ThreatModel) -> "Attack":
        return type(self)(threat, targeted=self.targeted, **self.params)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> AttackResult:
        """Attack the batch ``(x, y)`` (``y`` are targets when targeted). Returns an AttackResult."""
        check_images(x)
        y = check_dense_labels(y, x) if self._dense(y) else check_labels(y, x.shape[0])
        with eval_mode(model):
            result = self._attack(model, x.detach(), y.to(x.device), generator)
        # The contract: never outside the threat model (minimum-norm attacks: never outside the box),
        # whatever the algorithm did.
        x_adv = result.x_adv.detach()
        if self.minimum_norm:
            x_adv = torch.where(torch.isfinite(x_adv), x_adv, x).clamp(self.threat.lower, self.threat.upper)
        else:
            x_adv = self.threat.project(x_adv, x)
        result.x_adv = x_adv
        return result

    def repr_prefix(self) -> str:
        return f"{self.threat}, targeted={self.targeted}, "

    # ------------------------------------------------------------------ for subclasses

    def _attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> AttackResult:
        raise NotImplementedError

    def _dense(self, y: torch.Tensor) -> bool:
        """Per-pixel labels (N, H, W): a segmentation model is attacked (``dense`` attacks only)."""
        if not (isinstance(y, torch.Tensor) and y.dim() == 3):
            return False
        if not self.dense:
            raise RobustlabError(f"attack {self.name!r} does not attack segmentation models (per-pixel labels); "
                                 f"use one of {', '.join(n for n in ATTACKS.names() if ATTACKS.get(n).dense)}")
        return True

    def is_success(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sample: misclassified (untargeted) or classified as the target. Dense outputs: every
        pixel is (nothing is left to gain), so attacks on them run all their steps."""
        pred = logits.argmax(dim=1)
        hit = pred == y if self.targeted else pred != y
        return hit.flatten(1).all(dim=1) if hit.dim() > 1 else hit

    def loss_and_grad(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, eot: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (detached) and the input gradient of the per-sample ``loss`` (summed over samples).

        ``eot > 1`` (expectation over transformation, for randomized models and defenses): the
        gradient and the logits are averaged over ``eot`` forward/backward passes.
        """
        objective = get_loss(loss)
        forward, value = model_objective(model, lambda out: objective(out, y, self.targeted), x.shape[0],
                                         dense=y.dim() == 3)
        logits, _, grad = eot_gradient(forward, value, x, eot)
        return logits, grad

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits at ``x`` without gradients: (N, classes), or (N, classes, H, W) of a segmentation model."""
        with torch.no_grad():
            return check_logits(model(x), x.shape[0], dense=None)


def model_objective(
    model: nn.Module, objective: Callable[[torch.Tensor], torch.Tensor], n: int, dense: bool = False
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The (forward, objective) pair :func:`eot_gradient` takes for attacking ``model`` with the
    per-sample ``objective`` of its logits. A model may declare a term the attacker must subtract from
    its loss: a callable ``attack_penalty(x)`` giving (N,) or None (a defended model whose defense
    asks its attacker to also minimise the defense's own objective, so that the defense finds nothing
    to correct). The term is taken at the same input as the logits, inside the same graph. ``dense``:
    the model is a segmentation model (logits (N, classes, H, W))."""
    penalty = getattr(model, "attack_penalty", None)
    held: list[torch.Tensor] = []

    def forward(z: torch.Tensor) -> torch.Tensor:
        out = check_logits(model(z), n, dense=dense)
        if callable(penalty):
            term = penalty(z)
            if term is not None:
                held.append(term)
        return out

    def value(out: torch.Tensor) -> torch.Tensor:
        v = objective(out)
        return v - held.pop() if held else v

    return forward, value


def eot_gradient(
    forward: Callable[[torch.Tensor], torch.Tensor],
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    draws: int = 1,
    grad: bool = True,
    average: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expectation over transformation (Athalye et al. 2018), the one loop every attack uses: at
    ``x``, ``draws`` forward passes (each with its own random draw in a randomized model or defense),
    the per-sample ``objective`` of each output and, with ``grad``, its input gradient (of the sum
    over samples; only the input gets a gradient). Returns (output, objective, gradient or None),
    detached, each summed over the draws in order and, with ``average``, divided by ``draws`` (when
    more than one)."""
    out_sum = value_sum = grad_sum = None
    for _ in range(draws):
        if grad:
            x_req = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = forward(x_req)
                value = objective(out)
                (g,) = torch.autograd.grad(value.sum(), x_req)
            grad_sum = g if grad_sum is None else grad_sum + g
        else:
            with torch.no_grad():
                out = forward(x)
                value = objective(out)
        out, value = out.detach(), value.detach()
        out_sum = out if out_sum is None else out_sum + out
        value_sum = value if value_sum is None else value_sum + value
    if average and draws > 1:
        out_sum, value_sum = out_sum / draws, value_sum / draws
        grad_sum = grad_sum / draws if grad_sum is not None else None
    return out_sum, value_sum, grad_sum


ATTACKS: Registry[type[Attack]] = Registry("attack")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an Attack subclass buildable by its ``name``."""
    return ATTACKS.register(cls.name)(cls)


def create_attack(name: str, threat: ThreatModel, targeted: bool = False, **params: Any) -> Attack:
    """Build the registered attack ``name`` for ``threat`` with the given parameters."""
    return ATTACKS.get(name)(threat, targeted=targeted, **params)
