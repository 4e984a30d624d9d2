"""ImageDataset: images in [0, 1] with integer labels and class names, validated on construction."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from robustlab.checks import check_images, check_labels
from robustlab.errors import RobustlabError


@dataclass(eq=False, repr=False)
class ImageDataset:
    """A labelled image data set held in memory.

    name, split: where it came from (for example ``"mnist"``, ``"test"``).
    x: float32 tensor (N, C, H, W) with values in [0, 1].
    y: int64 tensor (N,) of class indices in [0, len(classes)); other integer dtypes are converted.
    classes: class names in label-index order.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        what = f"data set {self.name!r} ({self.split})"
        if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, (Sequence, np.ndarray)):
            raise RobustlabError(f"{what}: classes must be a list of class names, got {type(self.classes).__name__}")
        classes = [str(c) for c in self.classes]
        if not classes:
            raise RobustlabError(f"{what}: classes is empty; give one name per class")
        if len(set(classes)) != len(classes):
            dupes = sorted({c for c in classes if classes.count(c) > 1})
            raise RobustlabError(f"{what}: class names must be unique, repeated: {', '.join(dupes)}")
        self.classes = classes
        if isinstance(self.x, torch.Tensor) and self.x.dim() == 4 and self.x.shape[0] == 0:
            raise RobustlabError(f"{what} has no images")
        check_images(self.x, what=f"{what} images")
        if self.x.dtype != torch.float32:
            raise RobustlabError(f"{what} images must be float32, got {self.x.dtype}; convert with x.float()")
        self.y = check_labels(self.y, int(self.x.shape[0]), len(classes), what=f"{what} labels")
        # Loaders permute channels-last files to NCHW; a contiguous layout keeps convolutions on the
        # fast kernels for every batch sliced from here (measured: 1.4x per attack step on MNIST).
        # (.contiguous() is not enough: with one channel a permuted tensor already counts as contiguous.)
        self.x = self.x.clone(memory_format=torch.contiguous_format)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` examples, in order (all of them if ``n`` exceeds the size)."""
        n = _positive_int(n, "subset size n")
        return ImageDataset(self.name, self.split, self.x[:n], self.y[:n], list(self.classes))

    def take(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageDataset":
        """The examples at ``indices`` (integer positions, in the given order, repeats allowed),
        or where a boolean mask of length N is True."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dim() != 1:
            raise RobustlabError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
        if idx.numel() == 0:
            raise RobustlabError("take() selected no examples; a data set needs at least one")
        if idx.dtype == torch.bool:
            if idx.shape[0] != len(self):
                raise RobustlabError(f"a boolean mask must have length {len(self)}, got {idx.shape[0]}")
            idx = torch.nonzero(idx).flatten()
        elif idx.is_floating_point() or idx.is_complex():
            raise RobustlabError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.numel() == 0:
            raise RobustlabError("take() selected no examples; a data set needs at least one")
        idx = idx.long()
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= len(self):
            bad = lo if lo < 0 else hi
            raise RobustlabError(f"index {bad} is out of range for a data set of {len(self)} examples")
        return ImageDataset(self.name, self.split, self.x[idx], self.y[idx], list(self.classes))

    def batches(self, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield ``(batch_index, start, x, y)`` over consecutive batches, in order; the last may be
        smaller. ``start`` is the position of the batch's first example in the data set."""
        batch_size = _positive_int(batch_size, "batch_size")
        for batch_index, start in enumerate(range(0, len(self), batch_size)):
            stop = start + batch_size
            yield batch_index, start, self.x[start:stop], self.y[start:stop]


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise RobustlabError(f"{what} must be an integer >= 1, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RobustlabError(f"{what} must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise RobustlabError(f"{what} must be >= 1, got {n}")
    return n
