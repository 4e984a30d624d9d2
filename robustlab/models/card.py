"""The model card: what a checkpoint is, how to rebuild it, what it expects, how it scored.

A card describes any model, whatever built it (``source``):

- ``"registry"``: a robustlab architecture (``architecture`` + ``arch_kwargs``, ``num_classes``,
  ``in_channels``; the Normalize layer in front uses ``preprocessing``'s mean/std);
- ``"entry-point"``: the user's code, rebuilt by calling ``entry_point`` (``path/to/file.py:function``
  or ``package.module:function``) with ``arch_kwargs`` as keyword arguments;
- ``"external"``: a third-party model (timm, torchvision, ...), rebuilt the same way through an
  entry point such as ``timm:create_model`` with ``{"model_name": ...}``;
- ``"defended"``: a model (rebuilt from ``entry_point`` if set, else from the registry
  ``architecture``) behind the defenses listed in ``defense``, applied in order in front of it.

Cards written before these fields existed (source, entry_point, preprocessing, defense; input_size,
mean and std at the top level) load unchanged as registry cards.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustlab.errors import RobustlabError
from robustlab.models.dual_bn import BRANCHES
from robustlab.models.entry_points import portable_entry_point, split_entry_point
from robustlab.models.registry import TASKS, resolve_config

SOURCES = ("registry", "entry-point", "defended", "external")
# Top-level fields of cards written before ``preprocessing`` existed; they now live in it.
_LEGACY_PREPROCESSING = ("input_size", "mean", "std")


def _version() -> str:
    from robustlab import __version__

    return __version__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_form(value: Any, what: str) -> Any:
    """``value`` as JSON would give it back (tuples -> lists), so a card equals itself after a round trip."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise RobustlabError(f"model card: {what} must be JSON-serializable: {exc}") from None


def _size(value: Any, what: str, single: bool) -> None:
    """[H, W] of positive integers, or (single=True) also one positive integer."""
    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if (single and positive(value)) or (isinstance(value, list) and len(value) == 2 and all(map(positive, value))):
        return
    shape = "a positive integer or [H, W]" if single else "[H, W] (positive integers)"
    raise RobustlabError(f"model card: preprocessing.{what} must be {shape}, got {value!r}")


def _preprocessing(value: Any) -> dict[str, Any]:
    """Check the known keys of a preprocessing dict and give it in JSON form; other keys are kept."""
    if not isinstance(value, Mapping):
        raise RobustlabError(f"model card: preprocessing must be a JSON object (dict), got {type(value).__name__}")
    out = _json_form(dict(value), "preprocessing")
    if "input_size" in out:
        _size(out["input_size"], "input_size", single=False)
    for key in ("resize", "crop"):
        if out.get(key) is not None:
            _size(out[key], key, single=True)
    for key in ("mean", "std"):
        if key in out:
            try:
                out[key] = [float(v) for v in out[key]]
            except (TypeError, ValueError):
                raise RobustlabError(
                    f"model card: preprocessing.{key} must be a list of numbers, got {out[key]!r}"
                ) from None
    if "mean" in out and "std" in out and len(out["mean"]) != len(out["std"]):
        raise RobustlabError("model card: preprocessing.mean and preprocessing.std need one value per channel each")
    if any(s <= 0 for s in out.get("std", ())):
        raise RobustlabError(f"model card: preprocessing.std must be positive, got {out['std']}")
    return out


def _defense(value: Any) -> list[dict[str, Any]]:
    """Check a defense list: ``[{"name": str, "params": {...}}, ...]`` (params may be left out)."""
    if not isinstance(value, list):
        raise RobustlabError(f"model card: defense must be a list of {{\"name\", \"params\"}} objects, got {value!r}")
    out = []
    for item in value:
        what = f"the params of defense {item.get('name')!r}" if isinstance(item, Mapping) else ""
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise RobustlabError(
                f"model card: every defense needs a name: {{\"name\": ..., \"params\": {{...}}}}, got {item!r}"
            )
        extra = sorted(set(item) - {"name", "params"})
        if extra:
            raise RobustlabError(f"model card: defense {item['name']!r} has unknown key(s) {', '.join(extra)}; "
                                 f"its options go in \"params\"")
        params = item.get("params") or {}
        if not isinstance(params, Mapping):
            raise RobustlabError(f"model card: {what} must be an object, got {params!r}")
        out.append({"name": item["name"], "params": _json_form(dict(params), what)})
    return out


@dataclass
class ModelCard:
    """What a checkpoint is: how to rebuild it, what it expects, what it was trained on and how, how
    it scored.

    source: "registry", "entry-point", "external" or "defended" (see the module docstring).
    architecture: the registry name (required when the model is built from the registry; otherwise
    an optional descriptive name). entry_point: ``file.py:function`` (absolute path) or
    ``module:function`` that builds the model, or None for registry models. arch_kwargs: keyword
    arguments of the builder (``create_model`` options, or the entry point's arguments).
    num_classes / in_channels: required for registry models, optional (None) otherwise.
    preprocessing: what the model expects, in JSON form: ``input_size`` [H, W] in pixels, ``mean`` /
    ``std`` per channel in [0, 1] pixel units when normalization is inside the model (registry models
    always have them), and for streaming loaders ``resize`` / ``crop`` (a size or [H, W]); other keys
    are kept as given. defense: the defenses applied in order in front of the model, each
    ``{"name": ..., "params": {...}}``; empty for a plain model, non-empty exactly when source is
    "defended". clean_accuracy is a fraction in [0, 1]; robust_accuracy maps a threat description
    (e.g. "linf:8/255") to a fraction; sha256 is the hex digest of the weights file (filled in by
    ``save_checkpoint``). dual_bn is None for a plain model, or ``{"test_branch": "clean" | "adv"}``
    for one whose BatchNorm layers are split into clean and adversarial branches
    (``robustlab.models.dual_bn``; the weights hold both, the model is rebuilt with both and uses
    ``test_branch``). task: ``classification`` (logits (N, classes), the default, and what cards
    without the field are) or ``segmentation`` (per-pixel logits (N, classes, H, W); evaluated by the
    segmentation protocol).
    """

    source: str = "registry"
    architecture: str | None = None
    entry_point: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_channels: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    defense: list[dict[str, Any]] = field(default_factory=list)
    dataset: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    clean_accuracy: float | None = None
    robust_accuracy: dict[str, float] | None = None
    robustlab_version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)
    sha256: str = ""
    notes: str = ""
    dual_bn: dict[str, Any] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise RobustlabError(f"model card: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.source not in SOURCES:
            raise RobustlabError(f"model card: unknown source {self.source!r}; expected one of {', '.join(SOURCES)}")
        for key in ("num_classes", "in_channels"):
            value = getattr(self, key)
            if value is not None:
                try:
                    setattr(self, key, int(value))
                except (TypeError, ValueError):
                    raise RobustlabError(f"model card: {key} must be an integer, got {value!r}") from None
                if getattr(self, key) < 1:
                    raise RobustlabError("model card: num_classes and in_channels must be >= 1")
        if not isinstance(self.arch_kwargs, dict) or not isinstance(self.training, dict):
            raise RobustlabError("model card: arch_kwargs and training must be JSON objects (dicts)")
        self.arch_kwargs = _json_form(self.arch_kwargs, "arch_kwargs")
        self.preprocessing = _preprocessing(self.preprocessing)
        self.defense = _defense(self.defense)
        if self.dual_bn is not None:
            if not isinstance(self.dual_bn, dict) or self.dual_bn.get("test_branch") not in BRANCHES:
                raise RobustlabError(
                    f"model card: dual_bn must be null or {{\"test_branch\": one of {', '.join(BRANCHES)}}}, "
                    f"got {self.dual_bn!r}"
                )
            self.dual_bn = _json_form(self.dual_bn, "dual_bn")
        self._check_source()

    def _check_source(self) -> None:
        if bool(self.defense) != (self.source == "defended"):
            raise RobustlabError(
                "model card: source 'defended' needs a non-empty defense list" if self.defense == [] else
                f"model card: a card with defenses has source 'defended', not {self.source!r}"
            )
        if self.entry_point is not None:
            if self.source == "registry":
                raise RobustlabError("model card: a registry model has no entry_point (use source 'entry-point')")
            if not isinstance(self.entry_point, str) or split_entry_point(self.entry_point) is None:
                raise RobustlabError(f"model card: entry_point must be 'path/to/file.py:function' or "
                                     f"'package.module:function', got {self.entry_point!r}")
        elif self.source in ("entry-point", "external"):
            raise RobustlabError(f"model card: source {self.source!r} needs an entry_point (file.py:function or "
                                 f"module:function) that builds the model")
        if self.entry_point is None:  # built from the registry: everything create_model needs
            missing = [k for k in ("architecture", "num_classes", "in_channels") if getattr(self, k) is None]
            missing += [f"preprocessing.{k}" for k in _LEGACY_PREPROCESSING if k not in self.preprocessing]
            if missing:
                raise RobustlabError(f"model card is missing required field(s): {', '.join(missing)}")
            if not len(self.preprocessing["mean"]) == len(self.preprocessing["std"]) == self.in_channels:
                raise RobustlabError(
                    f"model card: mean and std need {self.in_channels} values each (one per channel), "
                    f"got {len(self.preprocessing['mean'])} and {len(self.preprocessing['std'])}"
                )

    # What the model expects (None when the card does not say).
    @property
    def input_size(self) -> tuple[int, int] | None:
        size = self.preprocessing.get("input_size")
        return (size[0], size[1]) if size else None

    @property
    def mean(self) -> tuple[float, ...] | None:
        return tuple(self.preprocessing["mean"]) if "mean" in self.preprocessing else None

    @property
    def std(self) -> tuple[float, ...] | None:
        return tuple(self.preprocessing["std"]) if "std" in self.preprocessing else None

    @property
    def builder(self) -> str:
        """How the model is rebuilt, for messages: "architecture 'X'" or "entry point 'Y'"."""
        return f"entry point {self.entry_point!r}" if self.entry_point else f"architecture {self.architecture!r}"

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
    ) -> ModelCard:
        """A registry card whose unspecified channels, input size, mean/std and dataset come from the
        registry's defaults for ``architecture`` (mirrors ``create_model``'s arguments). Extra
        ``preprocessing`` keys (resize, crop, ...) may be given and are added."""
        arch_kwargs = dict(arch_kwargs or {})
        cfg = resolve_config(architecture, in_channels, mean, std, **arch_kwargs)
        fields.setdefault("dataset", cfg["dataset"])
        fields.setdefault("task", cfg.get("task", "classification"))
        preprocessing = {"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"])}
        preprocessing.update(fields.pop("preprocessing", None) or {})
        return cls(
            source="registry",
            architecture=cfg["name"],
            num_classes=num_classes,
            in_channels=cfg["in_channels"],
            preprocessing=preprocessing,
            arch_kwargs=arch_kwargs,
            **fields,
        )

    @classmethod
    def for_entry_point(
        cls, entry_point: str, kwargs: dict[str, Any] | None = None, source: str = "entry-point", **fields: Any
    ) -> ModelCard:
        """A card for a model built by ``entry_point(**kwargs)`` (``file.py:function``, recorded with
        an absolute path, or ``module:function``); ``source`` is "entry-point" (your code) or
        "external" (a third-party package). Other card fields (num_classes, preprocessing, dataset,
        ...) are keyword arguments."""
        if source not in ("entry-point", "external"):
            raise RobustlabError(f"for_entry_point makes 'entry-point' or 'external' cards, not {source!r}")
        entry_point = portable_entry_point(entry_point)
        return cls(source=source, entry_point=entry_point, arch_kwargs=dict(kwargs or {}), **fields)

    def with_defense(self, defense: list[dict[str, Any]]) -> ModelCard:
        """This card's model behind ``defense`` (``[{"name": ..., "params": {...}}, ...]``, applied in
        order in front of it): source "defended". The weights stay those of the model itself."""
        if not defense:
            raise RobustlabError("with_defense needs at least one defense")
        return dataclasses.replace(self, source="defended", defense=list(defense))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build a card from a dict; unknown keys are ignored. Cards of earlier releases (no source,
        entry_point, preprocessing or defense; input_size/mean/std at the top level) read as registry
        cards. Missing version/creation time read as "" (unknown). Raises RobustlabError naming
        missing required fields or a malformed one."""
        if not isinstance(data, Mapping):
            raise RobustlabError(f"a model card must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        preprocessing = kwargs.get("preprocessing")
        preprocessing = dict(preprocessing) if isinstance(preprocessing, Mapping) else preprocessing or {}
        for key in _LEGACY_PREPROCESSING:
            if key in data and isinstance(preprocessing, dict):
                if key in preprocessing and _json_form(preprocessing[key], key) != _json_form(data[key], key):
                    raise RobustlabError(f"model card: {key} {data[key]!r} differs from preprocessing.{key} "
                                         f"{preprocessing[key]!r}; keep one")
                preprocessing[key] = data[key]
        kwargs["preprocessing"] = preprocessing
        kwargs["source"] = kwargs.get("source") or "registry"
        kwargs.setdefault("robustlab_version", "")
        kwargs.setdefault("created", "")
        for key, empty in (("arch_kwargs", {}), ("training", {}), ("defense", []), ("sha256", ""), ("notes", ""),
                           ("task", "classification")):
            if kwargs.get(key) is None:
                kwargs[key] = empty
        return cls(**kwargs)
