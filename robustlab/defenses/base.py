"""Defenses: named, registered, JSON-parameterised components that wrap a model into a defended
predictor, and declare what an honest attacker of them needs.

A defense implements ``transform(x, generator)``: a batched operation on images in [0, 1] in front of
the model. What it declares:

- ``randomized``: the transform draws random numbers (attacks need EOT: averaging gradients over
  ``eot`` draws; predictions vote over ``draws`` draws);
- ``differentiable``: gradients through the transform are meaningful; when False, attacks see the
  transform through BPDA, with ``surrogate`` (default the identity) in the backward pass;
- ``iterative``: the transform is an optimisation or a network of its own (purifiers): attacks
  differentiate through it as unrolled, or through ``surrogate``;
- ``attack_randomized``: predictions are deterministic but the attacker's view,
  ``attack_transform`` (default: ``transform``), draws random numbers: attacks average gradients over
  ``eot`` draws of it while predictions take one pass (the sampled gradient estimate of a model whose
  gradients are masked, k-WTA: defense ``sampled-gradients``);
- ``attack_draws``: the EOT draws an attack averages (default ``draws``; a defense that predicts from
  one draw but needs EOT from its attacker declares more);
- ``adaptive_attacks``: attacks (``NAME[:key=value,...]`` specs) built for this defense that the
  evaluation adds to the adaptive ones (the thermometer's LS-PGA, which ascends over the codes a pixel
  can take rather than over pixels);
- ``attack_loss``: the loss gradient attacks maximize in place of cross-entropy (default None: the
  attack's own), for models whose logits saturate the softmax (``margin-loss``, the MMC head).

Two optional hooks for defenses that need more than the image:

- ``bind(model)``: :class:`DefendedModel` calls it once with the model behind the defenses, for
  defenses that run the model themselves (test-time optimisation of the input: ``equivariance``);
- ``penalty(x, generator)``: a per-sample term (N,) the adaptive attacker subtracts from its loss
  (default None: nothing), e.g. the defense's own objective, so that the attack also leaves the
  defense nothing to correct. :meth:`DefendedModel.attack_penalty` sums them; the gradient attacks
  pick it up from the model they attack (:func:`robustlab.attacks.base.model_objective`).

:class:`DefendedModel` chains defenses in order in front of a model. Its ``forward`` is what attacks
differentiate (BPDA where declared); its ``predict`` is what the evaluation counts (the real
transforms, a majority vote over draws for randomized ones). ``needs()`` gathers the declarations
into :class:`AttackerNeeds`, which the evaluation uses to make attacks adaptive. An attack built
for one defense reaches its internals through ``sole_defense(methods)``: ``discrete_encoding()``
(LS-PGA, the thermometer), ``patch_library()`` (quilting-search, image quilting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from robustlab.checks import check_logits
from robustlab.defenses.bpda import BPDA
from robustlab.errors import RobustlabError
from robustlab.params import Configurable, parse_spec
from robustlab.predictor import Predictor
from robustlab.registry import Registry


@dataclass(frozen=True)
class AttackerNeeds:
    """What an adaptive attack on a defended model must do: average gradients over ``eot`` draws
    (1: deterministic), differentiate non-differentiable steps by BPDA (``bpda`` names them), attack
    through iterative steps (``through`` names them), subtract the penalties of the defenses
    ``penalty`` names from its loss, add the attacks ``attacks`` specifies (the defenses' own), and
    maximize ``loss`` where an attack maximizes cross-entropy (None: keep it)."""

    eot: int = 1
    bpda: tuple[str, ...] = ()
    through: tuple[str, ...] = ()
    penalty: tuple[str, ...] = ()
    attacks: tuple[str, ...] = ()
    loss: str | None = None

    def describe(self) -> str:
        parts = []
        if self.eot > 1:
            parts.append(f"EOT over {self.eot} draws")
        if self.bpda:
            parts.append(f"BPDA through {', '.join(self.bpda)}")
        if self.through:
            parts.append(f"gradients through {', '.join(self.through)}")
        if self.penalty:
            parts.append(f"loss minus the objective of {', '.join(self.penalty)}")
        if self.loss:
            parts.append(f"{self.loss} loss in place of cross-entropy")
        if self.attacks:
            parts.append(f"plus {', '.join(self.attacks)}")
        return "; ".join(parts) or "plain gradients (the defended model is differentiable and deterministic)"


class Defense(Configurable):
    """Base class: set ``name``, ``defaults`` (and ``choices``), implement ``transform``."""

    component: ClassVar[str] = "defense"
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    iterative: ClassVar[bool] = False
    attack_randomized: ClassVar[bool] = False
    # draws a prediction votes over, and EOT draws an attack averages (randomized defenses)
    default_draws: ClassVar[int] = 1
    # attacks built for this defense, added to the adaptive ones (specs NAME[:key=value,...])
    adaptive_attacks: ClassVar[tuple[str, ...]] = ()
    # the loss adaptive attacks maximize in place of cross-entropy (None: the attack's own)
    attack_loss: ClassVar[str | None] = None

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The defense's operation on a batch (N, C, H, W) in [0, 1]; random draws from ``generator``
        (the global generator if None)."""
        raise NotImplementedError

    def attack_transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the adaptive attacker differentiates in place of ``transform`` (default: ``transform``)."""
        return self.transform(x, generator)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable approximation of ``transform`` for BPDA (default: the identity)."""
        return x

    def bind(self, model: nn.Module) -> None:
        """Called once by :class:`DefendedModel` with the model behind the defenses (default: nothing;
        defenses that run the model themselves keep it)."""

    def penalty(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A differentiable per-sample term (N,) the adaptive attacker subtracts from its loss
        (default None: none)."""
        return None

    def output_channels(self, channels: int) -> int:
        """Channels of the transformed image for an input of ``channels`` (default: the same; an
        encoding such as the thermometer's changes it, and the model behind takes that many)."""
        return channels

    @property
    def draws(self) -> int:
        randomized = self.randomized or self.attack_randomized
        return int(self.params.get("draws", self.default_draws)) if randomized else 1

    @property
    def has_penalty(self) -> bool:
        """Whether :meth:`penalty` gives a term (default: it is overridden)."""
        return type(self).penalty is not Defense.penalty

    @property
    def attack_draws(self) -> int:
        """EOT draws an adaptive attack averages (default: ``draws``)."""
        return self.draws


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a Defense buildable by its ``name``."""
    return DEFENSES.register(cls.name)(cls)


def create_defense(name: str, **params: Any) -> Defense:
    return DEFENSES.get(name)(**params)


def build_defenses(specs: list[str | dict[str, Any]]) -> list[Defense]:
    """Defenses from ``NAME[:key=value,...]`` specs or ``{"name", "params"}`` configs, in order."""
    out = []
    for spec in specs:
        if isinstance(spec, dict):
            if "name" not in spec:
                raise RobustlabError(f"defense entry {spec!r} has no 'name'")
            out.append(create_defense(spec["name"], **dict(spec.get("params") or {})))
        else:
            name, params = parse_spec(spec, "defense")
            out.append(create_defense(name, **params))
    return out


class DefendedModel(Predictor):
    """``model(d_k(...d_1(x)))``: defenses in order in front of a model.

    ``forward`` is the attacker's view: non-differentiable transforms through BPDA with their
    surrogate, randomized ones drawing from :attr:`generator` (the runner seeds it per batch, so a
    resumed run draws the same). ``predict`` applies the real transforms and, for randomized defenses,
    takes the majority over ``draws`` draws from the given generator.
    """

    def __init__(self, model: nn.Module, defenses: list[Defense]) -> None:
        super().__init__()
        if not defenses:
            raise RobustlabError("a defended model needs at least one defense")
        self.model = model
        self.defenses = list(defenses)
        for i, d in enumerate(self.defenses):
            if isinstance(d, nn.Module):  # trained components (purifiers) move with the model
                self.add_module(f"defense{i}", d)
            d.bind(model)
        self.randomized = any(d.randomized for d in self.defenses)
        self.draws = max((d.draws for d in self.defenses if d.randomized), default=1)
        self.generator: torch.Generator | None = None

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Where ``forward``'s random draws come from (None: the global generator)."""
        self.generator = generator

    def _defend(self, x: torch.Tensor, generator: torch.Generator | None, view: str) -> torch.Tensor:
        """The defenses on ``x``: ``view`` "adaptive" (BPDA with each surrogate where declared),
        "naive" (the real transforms, a non-differentiable one passing a zero gradient: what an
        attacker who ignores the defense differentiates) or "predict" (the real transforms)."""
        for d in self.defenses:
            if view != "predict" and not d.differentiable:
                backward = d.surrogate if view == "adaptive" else (lambda t, d=d: d.surrogate(t) * 0)
                x = BPDA(lambda t, d=d: d.transform(t, generator), backward)(x)
            elif view == "adaptive":
                x = d.attack_transform(x, generator)
            else:
                x = d.transform(x, generator)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._defend(x, self.generator, "adaptive"))

    def forward_with(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        with torch.no_grad():
            # a classifier's (N, classes) or a segmentation model's (N, classes, H, W): the protocols
            # check which one they take before a run
            return check_logits(self.model(self._defend(x, generator, "predict")), x.shape[0], dense=None)

    def naive(self) -> nn.Module:
        """The attacker's view of one who treats the defended model as a plain one (what a defense's
        authors evaluated): gradients of the real pipeline, one random draw per pass, no BPDA (a
        non-differentiable step passes a zero gradient). Its predictions are the defended model's."""
        return _NaiveView(self)

    def needs(self) -> AttackerNeeds:
        return AttackerNeeds(
            eot=max((d.attack_draws for d in self.defenses if d.randomized or d.attack_randomized), default=1),
            bpda=tuple(d.name for d in self.defenses if not d.differentiable),
            through=tuple(d.name for d in self.defenses if d.iterative),
            penalty=tuple(d.name for d in self.defenses if d.has_penalty),
            attacks=tuple(dict.fromkeys(a for d in self.defenses for a in d.adaptive_attacks)),
            loss=next((d.attack_loss for d in self.defenses if d.attack_loss), None),
        )

    def sole_defense(self, *methods: str) -> tuple[Defense, nn.Module] | None:
        """(the defense, the model behind it) when the defenses are one defense that has every method
        of ``methods``; else None. How an attack built for one defense reaches its internals."""
        if len(self.defenses) == 1 and all(callable(getattr(self.defenses[0], m, None)) for m in methods):
            return self.defenses[0], self.model
        return None

    def discrete_encoding(self) -> tuple[Defense, nn.Module] | None:
        """(the encoding, the model behind it) when the defenses are one discrete input encoding, a
        defense with the bucket methods ``buckets``, ``relax`` and ``bucket_value`` (the thermometer);
        else None. What LS-PGA attacks."""
        return self.sole_defense("buckets", "relax", "bucket_value")

    def patch_library(self) -> tuple[Defense, nn.Module] | None:
        """(the quilting defense, the model behind it) when the defenses are one patch-library
        projection (methods ``library``, ``to_patches``, ``from_patches``, ``nearest``); else None.
        What ``quilting-search`` attacks."""
        return self.sole_defense("library", "to_patches", "from_patches", "nearest")

    def attack_penalty(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sum of the defenses' penalties at ``x`` (N,), differentiable, random draws from
        :attr:`generator`; None when no defense declares one. Attacks subtract it from their loss."""
        terms = [t for d in self.defenses if d.has_penalty for t in [d.penalty(x, self.generator)] if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def configs(self) -> list[dict[str, Any]]:
        """The defenses' configs, in order (recorded with runs and cards)."""
        return [d.config() for d in self.defenses]


def apply_defenses(model: nn.Module, specs: list[str | dict[str, Any]]) -> nn.Module:
    """``model`` behind the defenses ``specs`` (spec strings or configs), or ``model`` itself if none."""
    if not specs:
        return model
    return DefendedModel(model, build_defenses(specs))


class _NaiveView(Predictor):
    """See :meth:`DefendedModel.naive`."""

    def __init__(self, defended: DefendedModel) -> None:
        super().__init__()
        self.defended = defended
        self.randomized = defended.randomized
        self.draws = defended.draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.defended
        return d.model(d._defend(x, d.generator, "naive"))

    def forward_with(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.defended.forward_with(x, generator)
