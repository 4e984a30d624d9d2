"""Checkpoints: ``X.safetensors`` (weights) plus ``X.json`` (a model card) side by side.

The card says how to rebuild the model (architecture, classes, channels, mean/std, options), how it
was trained and how it scored, and the sha256 of the weights file, which is checked on load.
Nothing is ever unpickled: weights are safetensors, or a raw state dict read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robustlab.errors import RobustlabError
from robustlab.models.dual_bn import BRANCHES, convert_to_dual_bn, has_dual_bn, set_bn_branch
from robustlab.models.registry import create_model, resolve_config

WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
TORCH_SUFFIXES = (".pt", ".pth")
_REQUIRED = ("architecture", "num_classes", "in_channels", "input_size", "mean", "std")


def _version() -> str:
    from robustlab import __version__

    return __version__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """What a checkpoint is: how to rebuild it, what it was trained on and how, how it scored.

    input_size is (H, W) in pixels; mean/std are per channel in [0, 1] pixel units; clean_accuracy is
    a fraction in [0, 1]; robust_accuracy maps a threat description (e.g. "linf:8/255") to a
    fraction; sha256 is the hex digest of the weights file (filled in by ``save_checkpoint``).
    dual_bn is None for a plain model, or ``{"test_branch": "clean" | "adv"}`` for one whose
    BatchNorm layers are split into clean and adversarial branches (``robustlab.models.dual_bn``;
    the weights hold both, the model is rebuilt with both and uses ``test_branch``).
    """

    architecture: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    clean_accuracy: float | None = None
    robust_accuracy: dict[str, float] | None = None
    robustlab_version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)
    sha256: str = ""
    notes: str = ""
    dual_bn: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            self.num_classes = int(self.num_classes)
            self.in_channels = int(self.in_channels)
            h, w = (int(v) for v in self.input_size)
            self.input_size = (h, w)
            self.mean = tuple(float(v) for v in self.mean)
            self.std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError) as exc:
            raise RobustlabError(f"model card has a malformed field: {exc}") from None
        if not isinstance(self.arch_kwargs, dict) or not isinstance(self.training, dict):
            raise RobustlabError("model card: arch_kwargs and training must be JSON objects (dicts)")
        try:  # JSON form now (tuples -> lists), so a card equals itself after a save/load round trip
            self.arch_kwargs = json.loads(json.dumps(self.arch_kwargs))
        except (TypeError, ValueError) as exc:
            raise RobustlabError(f"model card: arch_kwargs must be JSON-serializable: {exc}") from None
        if self.dual_bn is not None:
            if not isinstance(self.dual_bn, dict) or self.dual_bn.get("test_branch") not in BRANCHES:
                raise RobustlabError(
                    f"model card: dual_bn must be null or {{\"test_branch\": one of {', '.join(BRANCHES)}}}, "
                    f"got {self.dual_bn!r}"
                )
            self.dual_bn = json.loads(json.dumps(self.dual_bn))
        if self.num_classes < 1 or self.in_channels < 1:
            raise RobustlabError("model card: num_classes and in_channels must be >= 1")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise RobustlabError(
                f"model card: mean and std need {self.in_channels} values each (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @classmethod
    def for_architecture(
        cls,
        architecture: str,
        num_classes: int = 10,
        in_channels: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        **fields: Any,
    ) -> "ModelCard":
        """A card whose unspecified channels, input size, mean/std and dataset come from the
        registry's defaults for ``architecture`` (mirrors ``create_model``'s arguments)."""
        arch_kwargs = dict(arch_kwargs or {})
        cfg = resolve_config(architecture, in_channels, mean, std, **arch_kwargs)
        fields.setdefault("dataset", cfg["dataset"])
        return cls(
            architecture=cfg["name"],
            num_classes=num_classes,
            in_channels=cfg["in_channels"],
            input_size=cfg["input_size"],
            mean=cfg["mean"],
            std=cfg["std"],
            arch_kwargs=arch_kwargs,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCard":
        """Build a card from a dict; unknown keys are ignored, missing required keys raise
        RobustlabError naming them. Missing version/creation time read as "" (unknown)."""
        if not isinstance(data, Mapping):
            raise RobustlabError(f"a model card must be a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise RobustlabError(f"model card is missing required field(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.setdefault("robustlab_version", "")
        kwargs.setdefault("created", "")
        for key in ("arch_kwargs", "training"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        kwargs["sha256"] = kwargs.get("sha256") or ""
        kwargs["notes"] = kwargs.get("notes") or ""
        return cls(**kwargs)


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

    ``path`` is ``X.safetensors`` or ``X`` (the suffix is added). The model must be what
    ``create_model`` builds from the card (checked, so the checkpoint can be loaded again);
    DataParallel/DDP/compiled wrappers are unwrapped. Returns the weights path.
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
    _compare_keys(
        expected,
        state,
        f"the model does not match the card's architecture {card.architecture!r} "
        f"(build it with create_model using the card's fields)",
    )
    for key, values in (("normalize.mean", card.mean), ("normalize.std", card.std)):
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
    save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": card.architecture})
    os.replace(tmp, weights)
    card = dataclasses.replace(card, sha256=sha256_file(weights))
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    tmp_card = card_path(weights).with_name(card_path(weights).name + ".tmp")
    tmp_card.write_text(text, encoding="utf-8")
    os.replace(tmp_card, card_path(weights))
    return weights


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


def _align_keys(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept common foreign layouts: 'module.'/'_orig_mod.' prefixes, and a bare architecture state
    dict (no Normalize layer; the card's mean/std are then used)."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if state and not any(k.startswith(("normalize.", "net.")) for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        for k in ("normalize.mean", "normalize.std"):
            state[k] = expected[k]
    return state


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint: weights (``X.safetensors``, or a raw state dict in ``X.pt``/``X.pth``)
    plus the card ``X.json`` beside them. The weights' sha256 is checked against the card; the model
    is rebuilt from the card, loaded strictly, moved to ``device`` and returned in eval mode. A
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
    model = _build(card)
    expected = model.state_dict()
    state = _align_keys(_read_weights(p), expected)
    _compare_keys(expected, state, f"weights {p} do not fit architecture {card.architecture!r} described by its card")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card
