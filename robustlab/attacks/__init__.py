"""Attacks: one module per family, all registered by name (see ``ATTACKS``)."""

from robustlab.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    create_attack,
    parse_attack_spec,
    register_attack,
)
from robustlab.attacks import pgd  # noqa: F401  (registers fgsm, bim, pgd, mifgsm)
from robustlab.attacks.suites import SUITES, build_attacks

__all__ = [
    "ATTACKS",
    "SUITES",
    "Attack",
    "AttackResult",
    "build_attacks",
    "create_attack",
    "parse_attack_spec",
    "register_attack",
]
