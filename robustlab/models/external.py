"""The models people already have: torchvision and timm architectures by name, RobustBench's zoo
architectures, and any registry architecture, with weights from a file on disk. Nothing is downloaded.

Specs (``load_model(spec, weights=FILE, num_classes=N)``, ``robustlab eval --model SPEC --weights FILE``):

- ``torchvision:NAME`` (e.g. ``torchvision:resnet18``): built with ``weights=None`` and ``num_classes``,
  behind robustlab's :class:`~robustlab.models.Normalize` with ImageNet's mean/std, the normalization
  torchvision's weights expect; the card's preprocessing gives the resize/crop of the weights' own
  transforms (resnet18: shorter side 256, centre crop 224).
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=N)`` behind Normalize with
  the mean/std, input size and crop_pct of its pretrained config (the optional ``timm`` extra).
- ``robustbench:NAME`` or ``robustbench:DATASET/THREAT/NAME`` (``robustbench:cifar10/Linf/Carmon2019Unlabeled``):
  the architecture RobustBench's model zoo builds for that entry (it normalizes inside, as robustlab
  models do), with the user's checkpoint. Needs the optional ``robustbench`` extra, which pins an
  older timm: install it in its own environment. (Not exercised by robustlab's tests.)
- a registry name (``resnet18``, ``wrn-28-10``, ...) with ``weights``: that architecture with these
  weights instead of random ones.

Weights are a safetensors file or a ``torch.save`` file read with ``torch.load(weights_only=True)``
(never unpickled): a state dict, or a checkpoint dict holding one under ``state_dict`` / ``model`` /
``model_state_dict`` / ``net``; ``module.`` / ``model.`` / ``_orig_mod.`` prefixes and bare architecture
state dicts (without the Normalize layer) are accepted. The model's card records the builder, the
preprocessing and the weights file's sha256, which is what identifies the model on the leaderboard.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.card import ModelCard
from robustlab.models.normalize import Normalize

PREFIXES = ("torchvision:", "timm:", "robustbench:")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NESTED = ("state_dict", "model", "model_state_dict", "net", "last")
_STRIP = ("module.", "model.", "_orig_mod.")


def is_external(spec: str) -> bool:
    return spec.startswith(PREFIXES)


def _wrap(net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Sequential:
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


# ---------------------------------------------------------------------- builders (card entry points)

def _torchvision_builder(name: str):
    try:
        import torchvision.models as tvm
    except ImportError:
        raise RobustlabError("torchvision: models need torchvision (pip install torchvision)") from None
    names = tvm.list_models(module=tvm)
    if name not in names:
        raise RobustlabError(f"torchvision has no classification architecture {name!r}{_suggest(name, names)}")
    return tvm.get_model_builder(name)


def torchvision_preprocessing(name: str) -> dict[str, Any]:
    """What torchvision's weights for ``name`` expect: ImageNet mean/std, the centre crop and the
    shorter-side resize of their transforms (256/224 when they do not say)."""
    import torchvision.models as tvm

    crop, resize = 224, 256
    try:
        keywords = getattr(tvm.get_model_weights(name).DEFAULT.transforms, "keywords", {})
        crop = int(keywords.get("crop_size", crop))
        resize = int(keywords.get("resize_size", resize if crop == 224 else round(crop / 0.875)))
    except (ValueError, KeyError, AttributeError):  # no weights enum for this builder
        pass
    return {"input_size": [crop, crop], "resize": resize, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def torchvision_model(name: str, num_classes: int = 1000) -> nn.Sequential:
    """torchvision architecture ``name`` with random weights (``weights=None``: nothing downloaded) for
    ``num_classes`` classes, behind Normalize with ImageNet's mean/std; takes [0, 1] images."""
    builder = _torchvision_builder(name)
    try:
        net = builder(weights=None, num_classes=num_classes)
    except TypeError as exc:
        raise RobustlabError(f"torchvision:{name} cannot be built with num_classes={num_classes}: {exc}") from None
    return _wrap(net, IMAGENET_MEAN, IMAGENET_STD)


def _timm():
    try:
        import timm
    except ImportError:
        raise RobustlabError("timm: models need the optional timm package (pip install 'robustlab[timm]')") from None
    return timm


def timm_model(name: str, num_classes: int = 1000) -> nn.Sequential:
    """timm architecture ``name`` (``pretrained=False``: nothing downloaded) for ``num_classes``
    classes, behind Normalize with the mean/std of its pretrained config."""
    timm = _timm()
    if not timm.is_model(name):
        raise RobustlabError(f"timm has no architecture {name!r}{_suggest(name, timm.list_models())}")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return _wrap(net, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def timm_preprocessing(name: str) -> dict[str, Any]:
    """Input size, crop_pct and mean/std from timm's pretrained config of ``name``."""
    timm = _timm()
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    size = list(cfg.get("input_size", (3, 224, 224)))[-2:]
    return {"input_size": size, "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD))}


def _robustbench_entry(spec: str) -> tuple[str, str, str]:
    """(dataset, threat model, name) of a RobustBench zoo entry: ``DATASET/THREAT/NAME`` or a ``NAME``
    found in exactly one (dataset, threat model)."""
    try:  # the whole package first: a copy that cannot import (e.g. one vendored without its dependencies)
        import robustbench  # noqa: F401  counts as missing, whatever submodules a failed import left behind
        from robustbench.model_zoo import model_dicts
    except ImportError as exc:
        raise RobustlabError("robustbench: models need the optional robustbench package (pip install "
                             "'robustlab[robustbench]'; it pins an older timm, so use a separate environment; "
                             f"importing it failed: {exc})") from None
    parts = spec.split("/")
    found = [(str(getattr(d, "value", d)), str(getattr(t, "value", t)), n)
             for d, threats in model_dicts.items() for t, models in threats.items() for n in models
             if n == parts[-1] and (len(parts) == 1 or (parts[0], parts[1]) == (str(getattr(d, "value", d)),
                                                                                str(getattr(t, "value", t))))]
    if len(parts) not in (1, 3) or not found:
        names = sorted({n for threats in model_dicts.values() for models in threats.values() for n in models})
        raise RobustlabError(f"RobustBench's model zoo has no model {spec!r} (write NAME or DATASET/THREAT/NAME)"
                             f"{_suggest(parts[-1], names)}")
    if len(found) > 1:
        raise RobustlabError(f"RobustBench model {spec!r} is in several zoos; write one of: "
                             f"{', '.join('/'.join(f) for f in found)}")
    return found[0]


def robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> nn.Module:
    """The architecture RobustBench's zoo builds for (dataset, threat_model, name), random weights,
    normalization inside (it takes [0, 1] images)."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)][name]["model"]()


def robustbench_preprocessing(dataset: str) -> dict[str, Any]:
    if dataset == "imagenet":  # RobustBench's 'Res256Crop224'
        return {"input_size": [224, 224], "resize": 256}
    return {"input_size": [32, 32]}


# ---------------------------------------------------------------------- weights

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: safetensors, or a ``torch.save`` file read with
    ``weights_only=True`` holding a state dict (possibly under state_dict / model / ... keys)."""
    p = Path(path)
    if not p.is_file():
        raise RobustlabError(f"weights file not found: {p}" if not p.exists() else f"weights path {p} is not a file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise RobustlabError(f"cannot read safetensors weights {p}: {_one_line(exc)}") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        # weights_only refuses pickled objects; a damaged or foreign file fails too
        raise RobustlabError(f"cannot read {p} with torch.load(weights_only=True) (a state dict saved with "
                             f"torch.save(model.state_dict(), path) is expected): {_one_line(exc)}") from None
    for _ in range(3):
        if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
        if not isinstance(state, Mapping):
            break
        state = next((state[k] for k in _NESTED if isinstance(state.get(k), Mapping)), None)
    raise RobustlabError(f"{p} holds no state dict of tensors; save one with torch.save(model.state_dict(), path)")


def _variants(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The state dict as saved, without wrapper prefixes, and under the Normalize wrapper's 'net.'."""
    out = [state]
    for prefix in _STRIP:
        if state and all(k.startswith(prefix) for k in state):
            out.append({k[len(prefix):]: v for k, v in state.items()})
    out += [{f"net.{k}": v for k, v in s.items()} for s in list(out)]
    out += [{f"model.{k}": v for k, v in s.items()} for s in list(out[: len(out) // 2])]
    return out


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, accepting the layouts of the module docstring; the
    model's own Normalize buffers fill in when the file has none. Raises one line naming the missing,
    unexpected and mis-shaped keys (and the class count when the classifier's is what differs)."""
    expected = model.state_dict()
    best = max(_variants(state), key=lambda s: len(expected.keys() & s.keys()))
    best = dict(best)
    for key in ("normalize.mean", "normalize.std"):
        if key in expected and key not in best:
            best[key] = expected[key]
    missing = [k for k in expected if k not in best]
    unexpected = [k for k in best if k not in expected]
    shapes = [k for k in expected if k in best and tuple(best[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(best, strict=True)
        return
    problems = []
    head = list(expected)[-2:]  # the classifier's weight and bias
    classes = [k for k in shapes if k in head and expected[k].dim() >= 1 and best[k].dim() == expected[k].dim()
               and best[k].shape[1:] == expected[k].shape[1:]]
    if classes:
        k = classes[0]
        problems.append(f"the weights are for {best[k].shape[0]} classes ({k} {tuple(best[k].shape)}), the model "
                        f"was built for {expected[k].shape[0]}: pass --num-classes {best[k].shape[0]}")
    for label, keys, show in (("missing keys", missing, str), ("unexpected keys", unexpected, str),
                              ("wrong shapes", [k for k in shapes if k not in classes],
                               lambda k: f"{k} {tuple(best[k].shape)} vs {tuple(expected[k].shape)}")):
        if keys:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            problems.append(f"{label}: {', '.join(show(k) for k in keys[:4])}{more}")
    raise RobustlabError(f"{what}: {'; '.join(problems)}")


# ---------------------------------------------------------------------- loading

def build_external(spec: str, num_classes: int) -> tuple[nn.Module, ModelCard]:
    """The model of an external spec with random weights, and its card (without sha256)."""
    kind, _, name = spec.partition(":")
    if not name:
        raise RobustlabError(f"{spec!r} names no architecture; write {kind}:NAME")
    if kind == "torchvision":
        model = torchvision_model(name, num_classes)
        card = ModelCard.for_entry_point("robustlab.models.external:torchvision_model",
                                         {"name": name, "num_classes": num_classes}, source="external",
                                         architecture=f"torchvision:{name}", num_classes=num_classes, in_channels=3,
                                         preprocessing=torchvision_preprocessing(name))
    elif kind == "timm":
        model = timm_model(name, num_classes)
        card = ModelCard.for_entry_point("robustlab.models.external:timm_model",
                                         {"name": name, "num_classes": num_classes}, source="external",
                                         architecture=f"timm:{name}", num_classes=num_classes, in_channels=3,
                                         preprocessing=timm_preprocessing(name))
    else:
        dataset, threat, zoo_name = _robustbench_entry(name)
        model = robustbench_model(zoo_name, dataset, threat)
        card = ModelCard.for_entry_point("robustlab.models.external:robustbench_model",
                                         {"name": zoo_name, "dataset": dataset, "threat_model": threat},
                                         source="external", architecture=f"robustbench:{dataset}/{threat}/{zoo_name}",
                                         preprocessing=robustbench_preprocessing(dataset), dataset=dataset)
    return model, card


def positive_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RobustlabError(f"--num-classes must be a positive integer, got {num_classes!r}")
    return num_classes
