"""Attack ensembles by name (``standard``, ``rand``) and user-defined ensembles from a small file.

``standard`` follows AutoAttack's standard protocol: APGD-CE, APGD-T (DLR, 9 target classes), FAB-T
(9 target classes), Square (5000 queries, its square-size schedule not rescaled, as in the reference);
at L1, AutoAttack's L1 version: APGD-CE (5 restarts) and APGD-T (9 target classes); the runner attacks
only still-robust points and keeps the worst case per sample. ``rand`` is AutoAttack's version for
randomized defenses: APGD-CE and APGD-DLR (untargeted, one restart, 100 steps) with EOT over 20
draws. ``standard`` asked of a model whose predictions are randomized resolves to ``rand``
(``build_attacks(..., randomized=True)``), as AutoAttack advises: the targeted, minimum-norm and
query-based members of ``standard`` would see one draw per step. An ensemble file lists attack specs,
one per line (``#`` comments), or as a JSON list of strings or ``{"name": ..., "params": {...}}``
objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from robustlab.attacks.base import Attack, create_attack
from robustlab.errors import RobustlabError
from robustlab.params import parse_spec
from robustlab.registry import Registry
from robustlab.threat import ThreatModel

SUITES: Registry[Callable[[ThreatModel], list[Attack]]] = Registry("attack suite")


@SUITES.register("standard")
def standard(threat: ThreatModel) -> list[Attack]:
    if threat.norm == "l1":
        # AutoAttack's standard version at L1 (Croce & Hein 2021): APGD-CE with 5 restarts and
        # APGD-T; FAB-T and Square are not part of it.
        return [
            create_attack("apgd-ce", threat, steps=100, restarts=5),
            create_attack("apgd-t", threat, steps=100, n_target_classes=9),
        ]
    return [
        create_attack("apgd-ce", threat, steps=100),
        create_attack("apgd-t", threat, steps=100, n_target_classes=9),
        create_attack("fab-t", threat, steps=100, n_target_classes=9),
        # As the reference: 5000 queries on the square-size schedule defined for 10,000 (not rescaled).
        create_attack("square", threat, queries=5000, rescale_schedule=False),
    ]


@SUITES.register("rand")
def rand(threat: ThreatModel) -> list[Attack]:
    return [
        create_attack("apgd-ce", threat, steps=100, eot=20),
        create_attack("apgd-dlr", threat, steps=100, eot=20),
    ]


def is_ensemble_file(spec: str) -> bool:
    """A spec names an ensemble file when it has no parameters and ends in .txt or .json (or is a
    file): ``transfer:surrogate=dir/m.safetensors`` is an attack, ``runs/mine.txt`` a file."""
    return "=" not in spec and (spec.endswith((".txt", ".json")) or Path(spec).is_file())


def read_ensemble_file(path: Path) -> list[str | dict]:
    """The attack specs listed in an ensemble file (text: one per line; or a JSON list)."""
    if not path.is_file():
        raise RobustlabError(f"ensemble file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RobustlabError(f"ensemble file {path} is not valid JSON: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, dict)) for i in items):
            raise RobustlabError(f"ensemble file {path} must hold a JSON list of attack specs")
        return items
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def suite_for(name: str, randomized: bool) -> str:
    """The suite to run for the suite ``name`` on a model whose predictions are (not) randomized:
    ``standard`` becomes ``rand`` on a randomized one."""
    return "rand" if randomized and name == "standard" else name


def build_attacks(specs: list[str | dict], threat: ThreatModel, randomized: bool = False) -> list[Attack]:
    """Attacks from specs: ``NAME[:key=value,...]``, a suite name, or an ensemble file, in order.
    ``randomized``: the model's predictions are randomized (the ``standard`` suite resolves to ``rand``)."""
    attacks: list[Attack] = []
    for spec in specs:
        if isinstance(spec, dict):
            if "name" not in spec:
                raise RobustlabError(f"attack entry {spec!r} has no 'name'")
            attacks.append(create_attack(spec["name"], threat, **dict(spec.get("params") or {})))
        elif is_ensemble_file(spec):
            attacks += build_attacks(read_ensemble_file(Path(spec)), threat, randomized)
        else:
            name, params = parse_spec(spec)
            if name in SUITES:
                if params:
                    raise RobustlabError(f"the {name!r} suite takes no parameters; list its attacks to change them")
                attacks += SUITES.get(suite_for(name, randomized))(threat)
            else:
                attacks.append(create_attack(name, threat, **params))
    if not attacks:
        raise RobustlabError("no attack given")
    return attacks
