"""Common corruptions (ImageNet-C / CIFAR-10-C / MNIST-C style): see :mod:`robustlab.corruptions.base`."""

from robustlab.corruptions.base import CORRUPTIONS, SEVERITIES, Corruption, create_corruption, register_corruption, suite

__all__ = ["CORRUPTIONS", "SEVERITIES", "Corruption", "create_corruption", "register_corruption", "suite"]

# Importing these modules registers their corruptions.
from robustlab.corruptions import mnist_c as _mnist_c  # noqa: F401
