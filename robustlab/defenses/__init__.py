"""Defenses: named components that wrap a model into a defended predictor (``--defense NAME:params``),
each declaring what an adaptive attacker of it needs (EOT, BPDA, attacking through it)."""

from robustlab.defenses import (  # noqa: F401  (registers the defenses)
    equivariance,
    filters,
    jpeg,
    margin,
    mixup_inference,
    nrp,
    quilting,
    randomized,
    sampled,
    thermometer,
    transforms,
)
from robustlab.defenses.base import (
    DEFENSES,
    AttackerNeeds,
    DefendedModel,
    Defense,
    apply_defenses,
    build_defenses,
    create_defense,
    register_defense,
)
from robustlab.defenses.bpda import BPDA, Pipeline, bpda

__all__ = [
    "BPDA",
    "DEFENSES",
    "AttackerNeeds",
    "DefendedModel",
    "Defense",
    "Pipeline",
    "apply_defenses",
    "bpda",
    "build_defenses",
    "create_defense",
    "register_defense",
]
