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

__all__ = ["ATTACKS", "Attack", "AttackResult", "create_attack", "parse_attack_spec", "register_attack"]
