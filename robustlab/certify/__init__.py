"""Certified robustness: randomized smoothing (``smoothing``, noises in ``noise``) and verified bounds by
bound propagation (``ibp``: interval bounds and CROWN-IBP)."""

from robustlab.certify.noise import NOISES, Noise, create_noise, register_noise
from robustlab.certify.smoothing import (
    Certificate,
    SmoothedClassifier,
    SmoothingWarning,
    certificate_from_counts,
    check_base_model,
    check_settings,
    clopper_pearson_lower,
    max_radius,
    predict_from_counts,
    smallest_certifying_n,
    smallest_predicting_n,
    too_few_draws,
    vote_counts,
)

__all__ = [
    "NOISES",
    "Certificate",
    "Noise",
    "SmoothedClassifier",
    "SmoothingWarning",
    "certificate_from_counts",
    "check_base_model",
    "check_settings",
    "clopper_pearson_lower",
    "create_noise",
    "max_radius",
    "predict_from_counts",
    "register_noise",
    "smallest_certifying_n",
    "smallest_predicting_n",
    "too_few_draws",
    "vote_counts",
]
