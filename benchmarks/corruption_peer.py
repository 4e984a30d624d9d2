"""The imagecorruptions package (the peer of the corruption benchmarks), made importable with today's
libraries, and helpers shared by ``corruptions_fidelity.py`` and ``corruptions_speed.py``.

Install: ``pip install imagecorruptions 'setuptools<81'`` (it imports ``pkg_resources``). Its last
release predates scikit-image 0.19 and NumPy 2: ``gaussian(..., multichannel=True)`` and
``np.float_`` no longer exist, which breaks glass blur, Gaussian blur and fog. :func:`load` restores
both names for the package only (``multichannel=True`` becomes ``channel_axis=-1``, ``np.float_`` is
``np.float64``); nothing else of the package is changed.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load():
    """The imagecorruptions package with the two compatibility names restored, or exit with how to
    install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import imagecorruptions
            import imagecorruptions.corruptions as impl
    except ImportError as exc:
        sys.exit(f"imagecorruptions is not importable ({exc}); pip install imagecorruptions 'setuptools<81'")
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    original = impl.gaussian
    if not getattr(original, "_robustlab_shim", False):
        def gaussian(image, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            return original(image, *args, **kwargs)

        gaussian._robustlab_shim = True
        impl.gaussian = gaussian
    warnings.filterwarnings("ignore", category=UserWarning)
    return imagecorruptions


def to_numpy_images(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC (rounded)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_peer_uint8(x: torch.Tensor) -> np.ndarray:
    """robustlab's float output as the peer writes its own: ``np.uint8(x * 255)`` (truncation)."""
    return np.uint8(np.clip(x.permute(0, 2, 3, 1).double().numpy() * 255, 0, 255))


def load_cifar_jpeg(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (float NCHW) and labels of the shared CIFAR-10 JPEG copy of the test set."""
    from benchmarks.common import shared_data_dir

    path = shared_data_dir() / "cifar10_test_jpeg75.npz"
    if not path.is_file():
        sys.exit(f"{path} not found: the shared CIFAR-10 test set (JPEG copy) is needed")
    with np.load(path) as data:
        x = torch.from_numpy(data["x"][:n]).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(data["y"][:n]).long()
    return x, y
