"""Training: one loop (``train``); standard training and adversarial recipes are objectives that
plug into it, registered by name in ``OBJECTIVES`` (``create_objective("trades", threat)``)."""

from robustlab.training.ema import ModelEMA
from robustlab.training.loop import TrainConfig, TrainHistory, accuracy, standard_objective, train
from robustlab.training.monitor import detect_catastrophic_overfitting, robust_validation, split_holdout
from robustlab.training.objectives import OBJECTIVES, Objective, create_objective, register_objective

__all__ = [
    "OBJECTIVES",
    "ModelEMA",
    "Objective",
    "TrainConfig",
    "TrainHistory",
    "accuracy",
    "create_objective",
    "detect_catastrophic_overfitting",
    "register_objective",
    "robust_validation",
    "split_holdout",
    "standard_objective",
    "train",
]
