"""Attacks: one module per family, all registered by name (see ``ATTACKS``)."""

from robustlab.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    create_attack,
    register_attack,
)
from robustlab.attacks import pgd  # noqa: F401  (registers fgsm, bim, pgd, mifgsm)
from robustlab.attacks import deepfool  # noqa: F401  (registers deepfool)
from robustlab.attacks import fab  # noqa: F401  (registers fab, fab-t, fab-min, fab-t-min)
from robustlab.attacks import cw  # noqa: F401  (registers cw)
from robustlab.attacks import ead  # noqa: F401  (registers ead)
from robustlab.attacks import apgd  # noqa: F401  (registers apgd-ce, apgd-dlr, apgd-t)
from robustlab.attacks import square  # noqa: F401  (registers square)
from robustlab.attacks import mm  # noqa: F401  (registers mm)
from robustlab.attacks import md  # noqa: F401  (registers md, md-mt)
from robustlab.attacks import spsa  # noqa: F401  (registers spsa)
from robustlab.attacks import nes  # noqa: F401  (registers nes)
from robustlab.attacks import hopskipjump  # noqa: F401  (registers hopskipjump)
from robustlab.attacks import boundary  # noqa: F401  (registers boundary)
from robustlab.attacks import brendel_bethge  # noqa: F401  (registers brendel-bethge)
from robustlab.attacks import onepixel  # noqa: F401  (registers onepixel)
from robustlab.attacks import pixle  # noqa: F401  (registers pixle)
from robustlab.attacks import spatial  # noqa: F401  (registers spatial-grid, spatial-fo)
from robustlab.attacks import universal  # noqa: F401  (registers uap)
from robustlab.attacks import patch  # noqa: F401  (registers patch)
from robustlab.attacks import transfer  # noqa: F401  (registers transfer)
from robustlab.attacks import ssp  # noqa: F401  (registers ssp)
from robustlab.attacks import fmn  # noqa: F401  (registers fmn)
from robustlab.attacks import ddn  # noqa: F401  (registers ddn)
from robustlab.attacks import sparse_rs  # noqa: F401  (registers sparse-rs)
from robustlab.attacks import jsma  # noqa: F401  (registers jsma)
from robustlab.attacks import lspga  # noqa: F401  (registers ls-pga)
from robustlab.attacks import kwta_bpda  # noqa: F401  (registers kwta-bpda)
from robustlab.attacks import quilting_search  # noqa: F401  (registers quilting-search)
from robustlab.attacks.suites import SUITES, build_attacks

__all__ = [
    "ATTACKS",
    "SUITES",
    "Attack",
    "AttackResult",
    "build_attacks",
    "create_attack",
    "register_attack",
]
