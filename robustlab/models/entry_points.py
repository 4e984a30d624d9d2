"""Entry points: a model built by calling a function named ``path/to/file.py:function`` or
``package.module:function``, with keyword arguments.

``load_model`` uses them for ``--model file.py:fn``; a checkpoint whose card has source
``entry-point``/``external`` is rebuilt through one before its weights are loaded. Calling an entry
point imports and runs that code: only load cards and specs you trust.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from robustlab.errors import RobustlabError

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def split_entry_point(spec: str) -> tuple[str, str] | None:
    """(target, attribute) if ``spec`` has the entry-point form 'file.py:fn' or 'pkg.module:fn', else None."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _DOTTED.match(attr):
        return None
    if target.endswith(".py") or _DOTTED.match(target):
        return target, attr
    return None


def _split(spec: str) -> tuple[str, str]:
    entry = split_entry_point(spec)
    if entry is None:
        raise RobustlabError(f"{spec!r} is not an entry point: write path/to/file.py:function or "
                             f"package.module:function")
    return entry


def portable_entry_point(spec: str) -> str:
    """``spec`` with a file target made absolute (so a card naming it works from any folder and
    after the checkpoint is copied, e.g. into the zoo); module targets are returned unchanged.
    Raises RobustlabError if ``spec`` is not an entry point."""
    target, attr = _split(spec)
    return f"{Path(target).resolve()}:{attr}" if target.endswith(".py") else spec


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


def _origin(module: Any) -> str:
    """A file imported by path is named by its path (its module name is internal), a module by its name."""
    name = getattr(module, "__name__", str(module))
    return getattr(module, "__file__", None) or name if name.startswith("robustlab_entry_") else name


def _resolve_attr(module: Any, attr: str, where: str) -> Callable[..., Any]:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RobustlabError(f"entry point {where}: {attr!r} not found in {_origin(module)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RobustlabError(f"entry point {where}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _check_arguments(fn: Callable[..., Any], where: str, kwargs: Mapping[str, Any]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        keywords = {p.name for p in params if p.kind is not p.POSITIONAL_ONLY}
        unknown = [k for k in kwargs if k not in keywords]
        if unknown:
            raise RobustlabError(f"entry point {where} takes no argument(s) {', '.join(unknown)}")
    required = [
        p.name
        for p in params
        if p.default is p.empty and p.name not in kwargs
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        given = f"with {', '.join(kwargs)}" if kwargs else "with no arguments"
        raise RobustlabError(
            f"entry point {where} requires argument(s) {', '.join(required)}; it is called {given} "
            f"(give them defaults, or wrap it in a function that takes none)"
        )


def build_from_entry_point(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import the target of ``spec`` (``file.py:fn`` or ``package.module:fn``; ``fn`` may be dotted,
    e.g. ``Class.build``), call it with ``kwargs`` (none by default) and return the nn.Module it
    builds. Raises RobustlabError (one line) when the file, module or function is missing, the
    arguments do not fit, or the result is not an nn.Module."""
    target, attr = _split(spec)
    module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    fn = _resolve_attr(module, attr, spec)
    kwargs = dict(kwargs or {})
    _check_arguments(fn, spec, kwargs)
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise RobustlabError(
            f"entry point {spec} returned a {type(model).__name__}; it must return a torch.nn.Module "
            f"mapping [0, 1] images to logits"
        )
    return model
