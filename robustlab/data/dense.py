"""Data sets with one label per pixel (segmentation): :class:`DenseDataset`.

The :class:`~robustlab.data.dataset.Dataset` protocol with ``dense = True``: ``labels`` and the
labels of ``batch(indices)`` are int64 maps (N, H, W) of class indices, one per pixel, at the size
of the images; class 0 is the background. Everything else (``len``, ``classes``, ``image_shape``,
``subset``, ``take``) is as for image-level data sets, so the evaluation runner and the training loop
read it the same way. Transforms that move pixels would move them away from their labels, so they
are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robustlab.checks import check_images
from robustlab.data.dataset import Dataset, TensorDataset, check_class_names
from robustlab.errors import RobustlabError


def check_dense_labels(y: object, x: torch.Tensor, num_classes: int | None = None, what: str = "labels") -> torch.Tensor:
    """Per-pixel labels must be an integer tensor (N, H, W) matching images ``x`` (N, C, H, W), with
    values in [0, num_classes). Returns them as int64."""
    if not isinstance(y, torch.Tensor):
        raise RobustlabError(f"{what} must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise RobustlabError(f"{what} must be an integer tensor, got dtype {y.dtype}")
    want = (x.shape[0], *x.shape[2:])
    if tuple(y.shape) != tuple(want):
        raise RobustlabError(f"per-pixel {what} must have shape (N, H, W) = {tuple(want)} to match the images, "
                             f"got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise RobustlabError(f"{what} must be >= 0, found {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise RobustlabError(f"{what} must be below the number of classes ({num_classes}), found {int(y.max())}")
    return y.long()


class DenseDataset(TensorDataset):
    """Images (N, C, H, W) float32 in [0, 1] and per-pixel labels (N, H, W) int64 held in memory.

    ``classes``: names in label order, ``classes[0]`` the background. ``describe``: how the data were
    made (recorded with evaluation runs), e.g. the scene generator's settings.
    """

    dense = True

    def __init__(self, name: str, split: str, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                 describe: dict | None = None) -> None:
        what = f"data set {name!r} ({split})"
        self.name, self.split = name, split
        self.classes = check_class_names(classes, what)
        check_images(x, what=f"{what} images")
        self.x = x.float().contiguous()
        self.y = check_dense_labels(y, x, len(self.classes), what=f"{what} labels")
        self.describe = dict(describe or {})

    def _select(self, positions: range | torch.Tensor) -> DenseDataset:
        sl = slice(positions.start, positions.stop) if isinstance(positions, range) else positions
        return DenseDataset(self.name, self.split, self.x[sl], self.y[sl], list(self.classes), self.describe)

    def with_transform(self, transform: Callable[..., torch.Tensor]) -> Dataset:
        raise RobustlabError(f"data set {self.name!r} has per-pixel labels; a transform would move the pixels "
                             "away from their labels (make the scenes at the size wanted instead: image_size=)")


def is_dense(data: Dataset) -> bool:
    """Whether ``data`` has one label per pixel (a segmentation data set)."""
    return bool(getattr(data, "dense", False))
