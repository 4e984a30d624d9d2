"""Training state on disk: tensors in safetensors, everything else in JSON; nothing is pickled.

A run directory holds ``state.json`` and the tensor file it names (``epoch-0003.safetensors``, or
``epoch-0003-batch-000120.safetensors`` for a state saved 120 batches into the fourth epoch).
Each save writes a new tensor file, then replaces ``state.json`` atomically, then deletes the tensor
files no longer named, so a run killed at any moment leaves a consistent state: the previous epoch's
or the new one. The JSON records the tensor file's sha256, checked on load.

Nested state (an optimizer's ``state_dict``, for instance) is stored by :func:`split_tensors`: every
tensor goes to the tensor file under a path-like key and is replaced in the JSON by
``{"__tensor__": key}``; dicts with non-string keys (optimizer state is keyed by parameter index)
become ``{"__items__": [[key, value], ...]}``; tuples become lists.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robustlab.errors import RobustlabError
from robustlab.models.checkpoint import sha256_file

STATE_FILE = "state.json"
FORMAT = "robustlab-train-state/1"


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-ready copy of ``obj`` with its tensors moved into ``tensors`` (keys start with ``prefix``)."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, split_tensors(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RobustlabError(f"cannot store a {type(obj).__name__} in the training state (at {prefix})")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise RobustlabError(f"the training state names a tensor {key!r} its tensor file does not hold")
            return tensors[key]
        if set(obj) == {"__items__"}:
            return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def module_tensors(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A module's state dict as tensor-file entries ``prefix/name`` (copied to CPU)."""
    return {f"{prefix}/{k}": v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}


def take_module(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries saved by :func:`module_tensors` under ``prefix``, as a state dict."""
    start = prefix + "/"
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}


def save_state(directory: str | os.PathLike[str], epoch: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               batch: int | None = None) -> Path:
    """Write the state after ``epoch`` (epochs done) atomically, or with ``batch`` after that many
    batches of the next epoch; returns the JSON path. The JSON records when it was saved."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}.safetensors" if batch is None else f"epoch-{epoch:04d}-batch-{batch:06d}.safetensors"
    target = root / name
    tmp = root / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, target)
    record = {**meta, "format": FORMAT, "epoch": epoch, "tensors_file": name, "sha256": sha256_file(target),
              "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        text = json.dumps(record, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RobustlabError(f"the training state must be JSON-serializable: {exc}") from None
    state = root / STATE_FILE
    tmp_state = root / (STATE_FILE + ".tmp")
    tmp_state.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp_state, state)
    for old in root.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return state


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The latest saved state in ``directory``: (meta, tensors), or None if there is none."""
    root = Path(directory)
    state = root / STATE_FILE
    if not state.is_file():
        return None
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustlabError(f"training state {state} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RobustlabError(f"{state} is not a robustlab training state ({FORMAT})")
    path = root / str(meta.get("tensors_file", ""))
    if not path.is_file():
        raise RobustlabError(f"training state {state} names {path.name}, which is missing")
    if sha256_file(path) != meta.get("sha256"):
        raise RobustlabError(f"{path} does not match {state} (sha256 differs); the state is damaged")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise RobustlabError(f"cannot read {path}: {exc}") from None
    return meta, tensors
