"""Checkpoints: ``X.safetensors`` (weights) plus ``X.json`` (a model card) side by side.

The card (``robustlab.models.card``) says how to rebuild the model (a registry architecture with its
options, or an entry point with its arguments), what it expects, how it was trained and how it
scored, and the sha256 of the weights file, which is checked on load. Nothing is ever unpickled:
weights are safetensors, or a raw state dict read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robustlab.errors import RobustlabError
from robustlab.models.card import ModelCard
from robustlab.models.dual_bn import convert_to_dual_bn, has_dual_bn, set_bn_branch
from robustlab.models.entry_points import build_from_entry_point
from robustlab.models.registry import create_model

WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
TORCH_SUFFIXES = (".pt", ".pth")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(weights: str | os.PathLike[str]) -> Path:
    """The card file that belongs to a weights file: same name, ``.json`` suffix."""
    return Path(weights).with_suffix(CARD_SUFFIX)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _build(card: ModelCard) -> nn.Module:
    """The card's model with fresh weights: ``entry_point(**arch_kwargs)``, or the registry's
    ``create_model`` with the card's fields."""
    if card.entry_point:
        model = build_from_entry_point(card.entry_point, card.arch_kwargs)
    else:
        model = create_model(
            card.architecture,
            num_classes=card.num_classes,
            in_channels=card.in_channels,
            mean=card.mean,
            std=card.std,
            **card.arch_kwargs,
        )
    if card.dual_bn is not None:  # both branches, the test-time one selected
        set_bn_branch(convert_to_dual_bn(model), card.dual_bn["test_branch"])
    return model


def _compare_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise RobustlabError listing missing, unexpected and mis-shaped tensors (if any)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise RobustlabError(f"{what}: {'; '.join(problems)}")


def _weights_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.suffix == WEIGHTS_SUFFIX:
        return p
    if p.suffix in (CARD_SUFFIX, *TORCH_SUFFIXES):
        raise RobustlabError(
            f"save_checkpoint writes {WEIGHTS_SUFFIX} weights; give a path like {p.with_suffix(WEIGHTS_SUFFIX)}"
        )
    return p.with_name(p.name + WEIGHTS_SUFFIX)


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write ``model``'s weights to ``X.safetensors`` and ``card`` (sha256 filled in) to ``X.json``.

    ``path`` is ``X.safetensors`` or ``X`` (the suffix is added). Any nn.Module can be saved: the
    card says how to rebuild it (``ModelCard.for_architecture`` for a registry model,
    ``ModelCard.for_entry_point`` for any other, ``.with_defense`` for one behind defenses), and the
    model must have the state dict of what the card builds (checked, by building it once, so the
    checkpoint can be loaded again). DataParallel/DDP/compiled wrappers are unwrapped. Returns the
    weights path.
    """
    weights = _weights_path(path)
    model = _unwrap(model)
    if has_dual_bn(model) != (card.dual_bn is not None):
        raise RobustlabError(
            "the model has dual batch norm but its card has no dual_bn field (set dual_bn={'test_branch': "
            "'clean'} or 'adv')" if card.dual_bn is None else
            "the card says dual_bn but the model has no dual batch norm (convert it with convert_to_dual_bn)"
        )
    state = model.state_dict()
    expected = _build(card).state_dict()  # (meta-device building would cost seconds of one-time setup)
    how = "the entry point with the card's arch_kwargs" if card.entry_point else "create_model using the card's fields"
    _compare_keys(expected, state, f"the model does not match the card's {card.builder} (build it with {how})")
    for key, values in () if card.entry_point else (("normalize.mean", card.mean), ("normalize.std", card.std)):
        actual = tuple(state[key].flatten().tolist())
        if not torch.allclose(torch.tensor(actual), torch.tensor(values), atol=1e-6):
            raise RobustlabError(f"the model's {key} {actual} differs from the card's {values}; make them agree")

    try:  # fail before writing anything
        json.dumps(card.to_dict())
    except (TypeError, ValueError) as exc:
        raise RobustlabError(f"the model card must be JSON-serializable (training, ...): {exc}") from None

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.device.index or 0)
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shared or partial storage: give it its own (safetensors refuses aliasing)
        else:
            seen.add(key)
        tensors[name] = t

    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    builder = {"entry_point": card.entry_point} if card.entry_point else {"architecture": card.architecture}
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": card.source, **builder})
    os.chmod(tmp, _file_mode())  # safetensors writes 0600; weights are shared like any other file
    os.replace(tmp, weights)
    card = dataclasses.replace(card, sha256=sha256_file(weights))
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    tmp_card = card_path(weights).with_name(card_path(weights).name + ".tmp")
    tmp_card.write_text(text, encoding="utf-8")
    os.replace(tmp_card, card_path(weights))
    return weights


def _file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read the card of a checkpoint (given its weights path or the card path itself)."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise RobustlabError(
            f"no model card for {path}: expected {cpath} (a checkpoint is X.safetensors plus its card X.json; "
            f"write both with robustlab.models.save_checkpoint)"
        )
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustlabError(f"model card {cpath} is not valid JSON: {exc}") from None
    return ModelCard.from_dict(data)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled objects: not a raw state dict
            raise RobustlabError(
                f"cannot read {path} as a raw state dict with torch.load(weights_only=True): {exc}"
            ) from None
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            keys = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
            raise RobustlabError(
                f"{path} is not a raw state dict of tensors (found {keys}); save one with "
                f"torch.save(model.state_dict(), path), or better, use save_checkpoint (safetensors)"
            )
        return dict(state)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise RobustlabError(f"cannot read safetensors weights {path}: {exc}") from None


def _align_keys(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], registry: bool
) -> dict[str, torch.Tensor]:
    """Accept common foreign layouts: 'module.'/'_orig_mod.' prefixes (of DataParallel/DDP/compile),
    and for a registry model a bare architecture state dict (no Normalize layer; the card's mean/std
    are then used)."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if registry and state and not any(k.startswith(("normalize.", "net.")) for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        for k in ("normalize.mean", "normalize.std"):
            state[k] = expected[k]
    return state


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint: weights (``X.safetensors``, or a raw state dict in ``X.pt``/``X.pth``)
    plus the card ``X.json`` beside them. The weights' sha256 is checked against the card; the model
    is rebuilt from the card (a registry architecture, or by calling its entry point: that imports and
    runs the code it names, so load only cards you trust), loaded strictly, moved to ``device`` and
    returned in eval mode. Defenses the card lists are *not* applied (the card says which). A
    dual-BN checkpoint (card field ``dual_bn``) comes back with both branches, routed through the
    card's ``test_branch`` (change it with ``robustlab.models.dual_bn.set_bn_branch``)."""
    p = Path(path)
    if p.suffix == CARD_SUFFIX:
        p = p.with_suffix(WEIGHTS_SUFFIX)
    elif p.suffix not in (WEIGHTS_SUFFIX, *TORCH_SUFFIXES) and not p.exists():
        p = p.with_name(p.name + WEIGHTS_SUFFIX)
    if not p.is_file():
        raise RobustlabError(f"checkpoint weights not found: {p}")
    card = read_card(p)
    if card.sha256:
        actual = sha256_file(p)
        if actual != card.sha256.lower():
            raise RobustlabError(
                f"weights file {p} does not match its card {card_path(p)}: sha256 is {actual}, the card says "
                f"{card.sha256}. The file was modified or belongs to another card; re-save the checkpoint"
            )
    else:
        warnings.warn(f"model card {card_path(p)} has no sha256; the weights in {p} are not verified", stacklevel=2)
    try:
        model = _build(card)
    except RobustlabError as exc:
        raise RobustlabError(f"cannot rebuild the model of {p} from its card: {exc}") from None
    expected = model.state_dict()
    state = _align_keys(_read_weights(p), expected, registry=not card.entry_point)
    _compare_keys(expected, state, f"weights {p} do not fit {card.builder} described by its card")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card
