"""``robustlab list``: what can be named on the command line, one line each (name and what it is),
read from the registries themselves, so whatever registers later is listed too."""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable
from typing import Any

WIDTH = 100  # characters of a description before it is cut


_ABBREVIATIONS = ("al", "e.g", "i.e", "etc", "vs", "cf", "approx", "Fig")


def _cut(text: str) -> str:
    return text if len(text) <= WIDTH else text[: WIDTH - 1] + "…"


def _first_sentence(obj: Any) -> str:
    """The first sentence of an object's docstring, on one line (``et al.`` and ``e.g.`` do not end
    it), without reST markup, cut to :data:`WIDTH` characters."""
    doc = inspect.getdoc(obj) or ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "")
    for match in re.finditer(r"\.(\s|$)", paragraph):
        words = paragraph[: match.start()].split()
        if not words or words[-1].lstrip("(").rstrip(".") not in _ABBREVIATIONS:
            return _cut(paragraph[: match.start()])
    return _cut(paragraph.rstrip("."))


def _attacks() -> list[tuple[str, str]]:
    from robustlab.attacks.base import ATTACKS

    out = []
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        out.append((name, f"[{cls.kind}, {'/'.join(cls.norms)}] {_first_sentence(cls)}"))
    return out


def _suites() -> list[tuple[str, str]]:
    from robustlab.attacks.suites import SUITES
    from robustlab.threat import ThreatModel

    out = []
    for name in SUITES.names():
        members = [a.name for a in SUITES.get(name)(ThreatModel("linf", 8 / 255))]
        doc = _first_sentence(SUITES.get(name))
        out.append((name, f"suite of attacks, run in order: {', '.join(members)}" + (f" ({doc})" if doc else "")))
    return out


def _models() -> list[tuple[str, str]]:
    from robustlab.models.registry import MODELS, model_config

    out = []
    for name in MODELS.names():
        cfg = model_config(name)
        h, w = cfg["input_size"]
        out.append((name, f"[{cfg['in_channels']}x{h}x{w}, {cfg['dataset']}] {_first_sentence(MODELS.get(name))}"))
    return out


def _recipes() -> list[tuple[str, str]]:
    import robustlab.vlm  # noqa: F401  (registers the vision-language recipes)
    from robustlab.training.objectives import OBJECTIVES

    out = []
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        tag = "adversarial" if getattr(cls, "adversarial", False) else "standard"
        if cls.model_kind != "classifier":
            tag += ", robustlab adapt"
        out.append((name, f"[{tag}] {_first_sentence(cls)}"))
    return out


def _datasets() -> list[tuple[str, str]]:
    from robustlab.data.catalog import DATASETS

    out = []
    for name in DATASETS.names():
        loader = DATASETS.get(name)
        spec = getattr(loader, "__self__", None)  # a standard data set: its spec says where it is read from
        if spec is not None and hasattr(spec, "splits"):
            text = f"[{', '.join(spec.splits)}] read from NAME_SPLIT.npz or the {spec.torchvision_layout}"
        else:
            text = _first_sentence(loader)
        out.append((name, text))
    return out


def _defenses() -> list[tuple[str, str]]:
    from robustlab.defenses import DEFENSES

    return [(name, _first_sentence(DEFENSES.get(name))) for name in DEFENSES.names()]


def _detectors() -> list[tuple[str, str]]:
    from robustlab.defenses.detection import DETECTORS

    return [(name, _first_sentence(DETECTORS.get(name))) for name in DETECTORS.names()]


def _corruptions() -> list[tuple[str, str]]:
    from robustlab.corruptions import CORRUPTIONS

    out = []
    for name in CORRUPTIONS.names():
        cls = CORRUPTIONS.get(name)
        tags = ", ".join(t for t in (cls.family, cls.suite_name) if t)
        out.append((name, (f"[{tags}] " if tags else "") + _first_sentence(cls)))
    return out


KINDS: dict[str, tuple[Callable[[], list[tuple[str, str]]], str]] = {
    "attacks": (_attacks, "--attack NAME[:key=value,...] (eval, perturb)"),
    "suites": (_suites, "--attack NAME (eval): several attacks in one name"),
    "models": (_models, "--model NAME (train; eval and perturb take them with random weights)"),
    "recipes": (_recipes, "--recipe NAME[:key=value,...] (train)"),
    "datasets": (_datasets, "--data NAME (eval, train)"),
    "defenses": (_defenses, "--defense NAME[:key=value,...] (eval, zoo add)"),
    "detectors": (_detectors, "--detector NAME[:key=value,...] (detect)"),
    "corruptions": (_corruptions, "common corruptions by name"),
}


def cmd_list(args: argparse.Namespace) -> int:
    rows = KINDS[args.what][0]()
    if not rows:
        print(f"no {args.what} are registered in this installation")
        return 0
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {_cut(text)}".rstrip())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    lp = sub.add_parser("list", help="list what can be named: attacks, suites, models, recipes, datasets, defenses, "
                        "detectors, corruptions (one line each)")
    lp.add_argument("what", choices=list(KINDS), metavar="WHAT",
                    help="; ".join(f"{k}: {usage}" for k, (_, usage) in KINDS.items()))
    lp.set_defaults(func=cmd_list)
