"""Defenses: named components that wrap a model into a defended predictor (``--defense NAME:params``),
each declaring what an adaptive attacker of it needs (EOT, BPDA, attacking through it)."""

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
from robustlab.defenses import equivariance, filters, jpeg, mixup_inference, quilting, randomized, sampled, thermometer, transforms  # noqa: F401  (registers the defenses)

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
