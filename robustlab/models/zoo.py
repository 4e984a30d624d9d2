"""The local model zoo: a folder of safetensors checkpoints with their model cards, loaded by name
(``zoo:NAME``) and verified by hash. The zoo's files never live in the repository.

Folder: ``$ROBUSTLAB_ZOO``, else ``~/.robustlab/zoo``. Each entry is ``NAME.safetensors`` plus
``NAME.json`` (its card, whose sha256 must match the weights). Any carded model can be an entry: a
registry architecture, an entry-point or external model, or a defended one (its card's ``defense``
list names the defenses; loading returns the bare model and the list, the caller applies them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from robustlab.errors import RobustlabError
from robustlab.models.checkpoint import (
    CARD_SUFFIX,
    WEIGHTS_SUFFIX,
    ModelCard,
    card_path,
    load_checkpoint,
    read_card,
    sha256_file,
)

PREFIX = "zoo:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def zoo_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The zoo folder: ``root``, else ``$ROBUSTLAB_ZOO``, else ``~/.robustlab/zoo``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("ROBUSTLAB_ZOO")
    return Path(env) if env else Path.home() / ".robustlab" / "zoo"


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith((WEIGHTS_SUFFIX, CARD_SUFFIX)):
        raise RobustlabError(f"zoo names use letters, digits, '.', '_' and '-' (no suffix), got {name!r}")
    return name


def list_zoo(root: str | os.PathLike[str] | None = None) -> list[tuple[str, ModelCard]]:
    """(name, card) of every entry, sorted by name."""
    folder = zoo_root(root)
    if not folder.is_dir():
        return []
    return [(p.stem, read_card(p)) for p in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}"))]


def zoo_card(name: str, root: str | os.PathLike[str] | None = None) -> ModelCard:
    return read_card(_entry(name, root))


def _entry(name: str, root: str | os.PathLike[str] | None) -> Path:
    path = zoo_root(root) / f"{_check_name(name)}{WEIGHTS_SUFFIX}"
    if not path.is_file():
        known = ", ".join(n for n, _ in list_zoo(root)) or "none"
        raise RobustlabError(f"no model {name!r} in the zoo at {zoo_root(root)}; it has: {known}")
    return path


def load_zoo_model(name: str, root: str | os.PathLike[str] | None = None, device="cpu") -> tuple[nn.Module, ModelCard]:
    """Load a zoo entry; the weights must match the sha256 in its card."""
    path = _entry(name, root)
    if not read_card(path).sha256:
        raise RobustlabError(f"zoo entry {name!r} has no sha256 in its card; re-add it with `robustlab zoo add`")
    return load_checkpoint(path, device=device)


def _check_is_checkpoint(path: Path) -> None:
    """A zoo entry is a safetensors weights file with its card: anything else is refused first, as
    what it is (a missing file, a folder, a file that is not safetensors), before its card is sought."""
    from safetensors import SafetensorError, safe_open

    what = "a checkpoint is X.safetensors plus its card X.json, written by robustlab.models.save_checkpoint"
    if not path.exists():
        raise RobustlabError(f"no checkpoint at {path} ({what})")
    if not path.is_file():
        raise RobustlabError(f"{path} is a folder, not a checkpoint ({what})")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RobustlabError(f"{path} is not a checkpoint: not a safetensors weights file ({first}; {what})") from None


def add_to_zoo(
    checkpoint: str | os.PathLike[str],
    name: str,
    root: str | os.PathLike[str] | None = None,
    robust_accuracy: dict[str, float] | None = None,
    clean_accuracy: float | None = None,
    overwrite: bool = False,
    defense: list[dict[str, Any]] | None = None,
) -> Path:
    """Copy a checkpoint and its card into the zoo as ``name`` (verifying its hash first), adding
    measured accuracies to the card. Overwriting an entry with the same weights (same sha256) keeps
    the accuracies its card already records, so evaluations can be added one at a time; other
    weights start from their own card. ``defense`` (defense configs, in order, validated by the
    caller) makes the entry a defended model: the same weights behind those defenses. Returns the
    zoo's weights path."""
    source = Path(checkpoint)
    _check_is_checkpoint(source)
    load_checkpoint(source)  # verifies the hash and that the weights fit the card
    card = read_card(source)
    if defense:
        card = card.with_defense(defense)
    digest = sha256_file(source)
    folder = zoo_root(root)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_check_name(name)}{WEIGHTS_SUFFIX}"
    merged = dict(card.robust_accuracy or {})
    if target.exists():
        if not overwrite:
            raise RobustlabError(f"the zoo already has {name!r}; choose another name or pass --overwrite")
        if card_path(target).is_file():
            old = read_card(target)
            if old.sha256 == digest:
                merged.update(old.robust_accuracy or {})
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    merged.update(robust_accuracy or {})
    card = dataclasses.replace(
        card,
        sha256=digest,
        robust_accuracy=merged or None,
        clean_accuracy=clean_accuracy if clean_accuracy is not None else card.clean_accuracy,
    )
    card_path(target).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return target
