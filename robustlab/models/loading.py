"""``load_model(spec)``: one way to get a model from a checkpoint, an entry point or a registry name."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.card import ModelCard
from robustlab.models.checkpoint import (
    CARD_SUFFIX,
    TORCH_SUFFIXES,
    WEIGHTS_SUFFIX,
    load_checkpoint,
    sha256_file,
)
from robustlab.models.dual_bn import set_bn_branch
from robustlab.models.entry_points import build_from_entry_point, split_entry_point
from robustlab.models.external import (
    build_external,
    fit_state_dict,
    is_external,
    positive_classes,
    read_state_dict,
)
from robustlab.models.registry import MODELS, create_model, list_models
from robustlab.models.zoo import PREFIX, load_zoo_model


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, on the requested device) and where it came from.

    source is "checkpoint", "zoo", "entry_point", "external" (weights from a file into a named
    architecture) or "registry" (random weights); card is None for entry points and bare registry names.

    ``model`` is the model the weights belong to, *without* the defenses its card may list:
    ``defense`` is that list (``[{"name": ..., "params": {...}}, ...]``, applied in order in front of
    the model; empty for a plain model). The models layer never imports robustlab.defenses; whoever
    evaluates or attacks the model applies them (``robustlab eval`` does).
    """

    model: nn.Module
    card: ModelCard | None
    source: str
    spec: str

    @property
    def defense(self) -> list[dict[str, Any]]:
        """The card's defense configs, in the order they wrap the model (a copy; [] without a card)."""
        return [dict(d, params=dict(d["params"])) for d in self.card.defense] if self.card else []


def _forms() -> str:
    names = ", ".join(list_models())
    return (
        "a model spec is one of: (a) a checkpoint path X.safetensors (with its card X.json beside it); "
        "(b) an entry point 'path/to/file.py:function' or 'package.module:function' whose function takes "
        f"no arguments and returns an nn.Module taking [0, 1] images; (c) zoo:NAME, a model of the local zoo "
        f"(robustlab zoo list); (d) torchvision:NAME, timm:NAME or robustbench:NAME with --weights FILE "
        f"(and --num-classes N); (e) a registry name (random weights, or --weights FILE): {names}"
    )


def load_model(spec: str, device: str | torch.device = "cpu", bn_branch: str | None = None, *,
               weights: str | Path | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a model from ``spec``: a checkpoint path (``.safetensors``/``.pt``/``.pth`` with its
    ``.json`` card), an entry point (``file.py:fn`` or ``package.module:fn``, called with no
    arguments) or a registry name (random weights; warns). The model is moved to ``device`` and put
    in eval mode. Raises RobustlabError for anything else, listing the accepted forms.

    bn_branch: for a model with dual batch norm, the branch to use (``clean`` or ``adv``); None keeps
    the card's ``test_branch`` (clean unless the trainer chose otherwise). Giving it for a model
    without dual batch norm is a RobustlabError.

    weights / num_classes: for ``torchvision:NAME``, ``timm:NAME``, ``robustbench:NAME`` and registry
    names, the weights file to load (safetensors or a state dict read with
    ``torch.load(weights_only=True)``) and the classes the architecture is built for (default: 1000
    for torchvision/timm, 10 for registry names); see :mod:`robustlab.models.external`. The card then
    records the weights file's sha256."""
    if weights is not None or num_classes is not None or (isinstance(spec, str) and is_external(spec.strip())):
        loaded = _load_with_weights(spec.strip() if isinstance(spec, str) else spec, weights, num_classes, device)
    else:
        loaded = _load(spec, device)
    if bn_branch is not None:
        set_bn_branch(loaded.model, bn_branch)
    return loaded


def _load(spec: str, device: str | torch.device) -> LoadedModel:
    if not isinstance(spec, str) or not spec.strip():
        raise RobustlabError(f"empty model spec; {_forms()}")
    spec = spec.strip()
    if spec.startswith(PREFIX):
        model, card = load_zoo_model(spec[len(PREFIX):], device=device)
        return LoadedModel(model, card, "zoo", spec)
    suffix = Path(spec).suffix.lower()

    if suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX, *TORCH_SUFFIXES):
        if not Path(spec).is_file():
            raise RobustlabError(f"checkpoint not found: {spec}")
        model, card = load_checkpoint(spec, device=device)
        return LoadedModel(model, card, "checkpoint", spec)

    entry = split_entry_point(spec)
    if entry is not None:
        return LoadedModel(build_from_entry_point(spec).to(device), None, "entry_point", spec)

    if spec in MODELS:
        warnings.warn(
            f"model {spec!r} comes from the registry with random (untrained) weights; results mean nothing "
            f"about robustness. Load a trained checkpoint (X.safetensors) for real numbers",
            stacklevel=2,
        )
        return LoadedModel(create_model(spec).to(device).eval(), None, "registry", spec)

    raise RobustlabError(f"cannot load model {spec!r}; {_forms()}")


def _load_with_weights(spec: str, weights: str | Path | None, num_classes: int | None,
                       device: str | torch.device) -> LoadedModel:
    """An external architecture (``torchvision:``, ``timm:``, ``robustbench:``) or a registry name,
    built for ``num_classes`` and given the weights in ``weights`` (random weights without; warns)."""
    if is_external(spec):
        classes = positive_classes(1000 if num_classes is None else num_classes)
        model, card = build_external(spec, classes)
    elif spec in MODELS:
        classes = positive_classes(10 if num_classes is None else num_classes)
        model = create_model(spec, num_classes=classes)
        card = ModelCard.for_architecture(spec, num_classes=classes)
    else:
        raise RobustlabError(f"--weights and --num-classes go with torchvision:NAME, timm:NAME, robustbench:NAME or "
                             f"a registry name ({', '.join(list_models())}), not {spec!r}")
    if weights is None:
        warnings.warn(f"model {spec!r} has random (untrained) weights: give its weights with --weights FILE; "
                      "results mean nothing about robustness", stacklevel=3)
        return LoadedModel(model.to(device).eval(), card, "external" if is_external(spec) else "registry", spec)
    fit_state_dict(model, read_state_dict(weights), f"weights {weights} do not fit {spec} "
                   f"({card.num_classes or 'its'} classes)")
    card = dataclasses.replace(card, sha256=sha256_file(weights))
    return LoadedModel(model.to(device).eval(), card, "external", spec)
