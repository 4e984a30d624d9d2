"""Training: one loop (``train``); standard training and adversarial recipes are objectives that
plug into it, registered by name in ``OBJECTIVES`` (``create_objective("trades", threat)``)."""

from robustlab.training.ema import ModelEMA
from robustlab.training.loop import TrainConfig, TrainHistory, accuracy, cpu_has_bf16, standard_objective, train
from robustlab.training.monitor import detect_catastrophic_overfitting, robust_validation, split_holdout
from robustlab.training.objectives import OBJECTIVES, Objective, create_objective, register_objective
from robustlab.training.unlabeled import UnlabeledData, load_unlabeled

# Importing these modules registers their recipes in OBJECTIVES.
from robustlab.training import advprop as _advprop  # noqa: E402,F401  (dual-bn)
from robustlab.training import certified as _certified  # noqa: E402,F401  (ibp, crown-ibp)
from robustlab.training import mmc as _mmc  # noqa: E402,F401  (mmc)
from robustlab.training import semisupervised as _semisupervised  # noqa: E402,F401  (rst, uat)
from robustlab.training import smoothing as _smoothing  # noqa: E402,F401  (noise, smoothadv)
from robustlab.training.adaptive import fosc  # also registers the mma and dynamic-at recipes

__all__ = [
    "OBJECTIVES",
    "ModelEMA",
    "Objective",
    "TrainConfig",
    "TrainHistory",
    "UnlabeledData",
    "accuracy",
    "cpu_has_bf16",
    "create_objective",
    "detect_catastrophic_overfitting",
    "fosc",
    "load_unlabeled",
    "register_objective",
    "robust_validation",
    "split_holdout",
    "standard_objective",
    "train",
]
