"""``load_model(spec)``: one way to get a model from a checkpoint, an entry point or a registry name."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robustlab.errors import RobustlabError
from robustlab.models.card import ModelCard
from robustlab.models.checkpoint import CARD_SUFFIX, TORCH_SUFFIXES, WEIGHTS_SUFFIX, load_checkpoint
from robustlab.models.dual_bn import set_bn_branch
from robustlab.models.entry_points import build_from_entry_point, split_entry_point
from robustlab.models.registry import MODELS, create_model, list_models
from robustlab.models.zoo import PREFIX, load_zoo_model


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, on the requested device) and where it came from.

    source is "checkpoint", "zoo", "entry_point" or "registry"; card is None unless loaded from a
    checkpoint or the zoo.

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
        f"(robustlab zoo list); (d) a registry name: {names}"
    )


def load_model(spec: str, device: str | torch.device = "cpu", bn_branch: str | None = None) -> LoadedModel:
    """Load a model from ``spec``: a checkpoint path (``.safetensors``/``.pt``/``.pth`` with its
    ``.json`` card), an entry point (``file.py:fn`` or ``package.module:fn``, called with no
    arguments) or a registry name (random weights; warns). The model is moved to ``device`` and put
    in eval mode. Raises RobustlabError for anything else, listing the accepted forms.

    bn_branch: for a model with dual batch norm, the branch to use (``clean`` or ``adv``); None keeps
    the card's ``test_branch`` (clean unless the trainer chose otherwise). Giving it for a model
    without dual batch norm is a RobustlabError."""
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
