"""Common corruptions (ImageNet-C / CIFAR-10-C / MNIST-C style): see :mod:`robustlab.corruptions.base`.

The 15 ImageNet-C corruptions and the 4 extra ones are registered here in the published order
(that order is what :func:`suite` lists); the MNIST-C ones by importing :mod:`.mnist_c`.
"""

from robustlab.corruptions.base import (
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    create_corruption,
    register_corruption,
    suite,
)
from robustlab.corruptions.blur import (
    DefocusBlur,
    GaussianBlur,
    GlassBlur,
    MotionBlur,
    ZoomBlur,
)
from robustlab.corruptions.digital import (
    Brightness,
    Contrast,
    ElasticTransform,
    JpegCompression,
    Pixelate,
    Saturate,
)
from robustlab.corruptions.noise import (
    GaussianNoise,
    ImpulseNoise,
    ShotNoise,
    SpeckleNoise,
)
from robustlab.corruptions.weather import Fog, Frost, Snow, Spatter

IMAGENET_C = (GaussianNoise, ShotNoise, ImpulseNoise, DefocusBlur, GlassBlur, MotionBlur, ZoomBlur, Snow, Frost, Fog,
              Brightness, Contrast, ElasticTransform, Pixelate, JpegCompression)
IMAGENET_C_EXTRA = (SpeckleNoise, GaussianBlur, Spatter, Saturate)

for _cls in IMAGENET_C + IMAGENET_C_EXTRA:
    register_corruption(_cls)

__all__ = ["CORRUPTIONS", "SEVERITIES", "Corruption", "create_corruption", "register_corruption", "suite"]

# Importing these modules registers their corruptions.
from robustlab.corruptions import mnist_c as _mnist_c  # noqa: F401
