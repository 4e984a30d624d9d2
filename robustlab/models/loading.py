"""``load_model(spec)``: one way to get a model from a checkpoint, an entry point or a registry name."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from robustlab.errors import RobustlabError
from robustlab.models.checkpoint import CARD_SUFFIX, TORCH_SUFFIXES, WEIGHTS_SUFFIX, ModelCard, load_checkpoint
from robustlab.models.dual_bn import set_bn_branch
from robustlab.models.registry import MODELS, create_model, list_models
from robustlab.models.zoo import PREFIX, load_zoo_model

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, on the requested device) and where it came from.

    source is "checkpoint", "zoo", "entry_point" or "registry"; card is None unless loaded from a
    checkpoint or the zoo.
    """

    model: nn.Module
    card: ModelCard | None
    source: str
    spec: str


def _forms() -> str:
    names = ", ".join(list_models())
    return (
        "a model spec is one of: (a) a checkpoint path X.safetensors (with its card X.json beside it); "
        "(b) an entry point 'path/to/file.py:function' or 'package.module:function' whose function takes "
        f"no arguments and returns an nn.Module taking [0, 1] images; (c) zoo:NAME, a model of the local zoo "
        f"(robustlab zoo list); (d) a registry name: {names}"
    )


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise RobustlabError(f"entry point file not found: {path}")
    resolved = path.resolve()
    name = f"robustlab_entry_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise RobustlabError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so dataclasses, pickling and relative lookups inside it work
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise RobustlabError(
                f"cannot import module {name!r}: not found (install it, or put its folder on PYTHONPATH)"
            ) from None
        raise


def _resolve_attr(module: Any, attr: str, where: str) -> Callable[..., Any]:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RobustlabError(f"entry point {where}: {attr!r} not found in {getattr(module, '__name__', module)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RobustlabError(f"entry point {where}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _call_entry_point(fn: Callable[..., Any], where: str) -> nn.Module:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [
            p.name
            for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise RobustlabError(
                f"entry point {where} requires argument(s) {', '.join(required)}; it is called with no "
                f"arguments (give them defaults, or wrap it in a function that takes none)"
            )
    model = fn()
    if not isinstance(model, nn.Module):
        raise RobustlabError(
            f"entry point {where} returned a {type(model).__name__}; it must return a torch.nn.Module "
            f"mapping [0, 1] images to logits"
        )
    return model


def split_entry_point(spec: str) -> tuple[str, str] | None:
    """(target, attribute) if ``spec`` has the entry-point form 'file.py:fn' or 'pkg.module:fn', else None."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _DOTTED.match(attr):
        return None
    if target.endswith(".py") or _DOTTED.match(target):
        return target, attr
    return None


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
        target, attr = entry
        module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
        model = _call_entry_point(_resolve_attr(module, attr, spec), spec)
        return LoadedModel(model.to(device), None, "entry_point", spec)

    if spec in MODELS:
        warnings.warn(
            f"model {spec!r} comes from the registry with random (untrained) weights; results mean nothing "
            f"about robustness. Load a trained checkpoint (X.safetensors) for real numbers",
            stacklevel=2,
        )
        return LoadedModel(create_model(spec).to(device).eval(), None, "registry", spec)

    raise RobustlabError(f"cannot load model {spec!r}; {_forms()}")
