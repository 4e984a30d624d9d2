"""Architectures by name (timm style): ``create_model(name)`` builds Normalize + network.

Each architecture registers a factory ``f(num_classes=..., in_channels=..., **options) -> nn.Module``
together with a default config (input channels, input size, mean/std, data set), so preprocessing
travels with the model.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch.nn as nn

from robustlab.errors import RobustlabError
from robustlab.models.kwta import parse_activation, use_kwta
from robustlab.models.mmc import MMCHead, parse_head
from robustlab.models.normalize import Normalize, as_channel_tuple
from robustlab.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")
#: What a model's outputs are: one prediction per image, or one per pixel.
TASKS = ("classification", "segmentation")
_CONFIGS: dict[str, dict[str, Any]] = {}


def register_model(
    name: str,
    *,
    in_channels: int,
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    dataset: str,
    task: str = "classification",
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register an architecture factory under ``name`` with its default config.

    ``input_size`` is (H, W) in pixels; ``mean``/``std`` are per-channel, in [0, 1] pixel units;
    ``task``: what the outputs are, ``classification`` (logits (N, classes)) or ``segmentation``
    (per-pixel logits (N, classes, H, W)).
    """
    if task not in TASKS:
        raise ValueError(f"model {name!r}: task must be one of {', '.join(TASKS)}")
    mean_t, std_t = as_channel_tuple(mean, "mean"), as_channel_tuple(std, "std")
    if not len(mean_t) == len(std_t) == in_channels:
        raise ValueError(f"model {name!r}: mean/std need {in_channels} values each")
    config = {
        "name": name.lower(),
        "in_channels": int(in_channels),
        "input_size": (int(input_size[0]), int(input_size[1])),
        "mean": mean_t,
        "std": std_t,
        "dataset": dataset,
        "task": task,
    }

    def add(factory: ModelFactory) -> ModelFactory:
        MODELS.register(name)(factory)
        _CONFIGS[name.lower()] = config
        return factory

    return add


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return MODELS.names()


def model_config(name: str) -> dict[str, Any]:
    """A copy of the default config of architecture ``name``: name, in_channels, input_size (H, W),
    mean, std, dataset, task. Raises RobustlabError listing known names if ``name`` is unknown."""
    MODELS.get(name)  # the clear unknown-name error
    return copy.deepcopy(_CONFIGS[name.lower()])


def _channel_stats(
    name: str, values: float | Sequence[float] | None, default: tuple[float, ...], in_channels: int, what: str
) -> tuple[float, ...]:
    if values is None:
        if len(default) == in_channels:
            return default
        if len(set(default)) == 1:  # a constant per-channel value broadcasts to any channel count
            return default[:1] * in_channels
        raise RobustlabError(
            f"model {name!r} defaults to {len(default)}-channel {what} {default}; with in_channels={in_channels} "
            f"pass {what}= with {in_channels} values"
        )
    out = as_channel_tuple(values, what)
    if len(out) == 1 and in_channels > 1:
        out = out * in_channels
    if len(out) != in_channels:
        raise RobustlabError(f"{what} has {len(out)} values but the model takes {in_channels} channels")
    return out


def _check_options(name: str, factory: ModelFactory, options: dict[str, Any]) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(k for k in accepted if k not in ("num_classes", "in_channels")) or "no options"
        raise RobustlabError(f"model {name!r} has no option {', '.join(unknown)}; it takes: {takes}")


# Options every architecture takes, handled here rather than by the factory.
COMMON_OPTIONS = ("activation", "head")


def _split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the common options, parsed; the architecture's own options)."""
    common = {"activation": parse_activation(kwargs.get("activation", "relu")),
              "head": parse_head(kwargs.get("head", "linear"))}
    return common, {k: v for k, v in kwargs.items() if k not in COMMON_OPTIONS}


def resolve_config(
    name: str,
    in_channels: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The config ``create_model`` would use for these arguments: the defaults of ``name`` with
    in_channels, mean and std (per channel, pixel units) and input_size (from an ``input_size``
    option, if given) filled in. Validates the arguments and options; raises RobustlabError."""
    factory = MODELS.get(name)
    cfg = model_config(name)
    channels = cfg["in_channels"] if in_channels is None else in_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise RobustlabError(f"in_channels must be a positive integer, got {in_channels!r}")
    cfg["in_channels"] = channels
    cfg["mean"] = _channel_stats(name, mean, cfg["mean"], channels, "mean")
    cfg["std"] = _channel_stats(name, std, cfg["std"], channels, "std")
    _split_options(kwargs)  # validates the options every architecture takes
    _check_options(name, factory, {k: v for k, v in kwargs.items() if k not in COMMON_OPTIONS})
    if "input_size" in kwargs:
        cfg["input_size"] = tuple(int(v) for v in kwargs["input_size"])
    return cfg


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Sequential:
    """Build architecture ``name`` (fresh random weights) behind a Normalize layer.

    Returns ``nn.Sequential(normalize=Normalize(mean, std), net=<architecture>)`` mapping [0, 1]
    images (N, C, H, W) to logits (N, num_classes). ``in_channels``, ``mean`` and ``std`` default to
    the architecture's config; extra keyword arguments are architecture options (e.g. ``depth``), or
    options every architecture takes: ``activation="kwta:RATIO"`` (k-winners-take-all in place of
    every ReLU, :mod:`robustlab.models.kwta`), ``head="mmc:C"`` (the output read as features, the logits
    minus squared distances to Max-Mahalanobis centers of radius C, :mod:`robustlab.models.mmc`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RobustlabError(f"num_classes must be a positive integer, got {num_classes!r}")
    cfg = resolve_config(name, in_channels, mean, std, **kwargs)
    common, kwargs = _split_options(kwargs)
    net = MODELS.get(name)(num_classes=num_classes, in_channels=cfg["in_channels"], **kwargs)
    if common["activation"] is not None:
        use_kwta(net, common["activation"])
    if common["head"] is not None:
        net = MMCHead(net, num_classes, common["head"])
    return nn.Sequential(OrderedDict(normalize=Normalize(cfg["mean"], cfg["std"]), net=net))
