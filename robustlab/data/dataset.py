"""The data set protocol and its two general kinds.

:class:`Dataset` is what every consumer of data sees: ``len(data)``, ``name``, ``split``,
``classes``, ``num_classes``, ``image_shape`` (C, H, W after transforms), ``labels`` (all N labels,
int64, always in memory) and ``batch(indices) -> (x, y)``: float32 images (n, C, H, W) in [0, 1],
contiguous in the default memory format, and their int64 labels, for integer positions. A
``range`` (or ``slice``) of consecutive positions is the fast path. ``subset``, ``take``,
``with_transform`` and ``materialize`` work for every kind.

- :class:`ImageDataset` holds all images in memory (``x``, ``y``); ``batch(range(a, b))`` is
  ``(x[a:b], y[a:b])``. The fast path for small sets and what training loops index.
- :class:`TransformedDataset` applies a per-batch transform (resize, crop, corruption) to another
  data set, reading only the requested images from it.
- Streaming sources (``robustlab.data.image_folder.ImageFolderDataset``) decode per batch.
"""

from __future__ import annotations

import abc
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from robustlab.checks import check_images, check_labels
from robustlab.data.transforms import as_transform, check_transformed, output_shape
from robustlab.errors import RobustlabError


class Dataset(abc.ABC):
    """A labelled image data set read batch by batch (see the module docstring).

    Subclasses set ``name``, ``split``, ``classes`` and implement ``__len__``, ``labels``,
    ``image_shape``, ``_read(positions, generator)`` (the images at ``positions``, a ``range`` with
    step 1 or an int64 tensor, already checked) and ``_select(positions)`` (a data set of those
    examples).
    """

    name: str
    split: str
    classes: list[str]

    #: True when every image is held in memory (``batch`` decodes and transforms nothing).
    in_memory: bool = False
    #: True when the labels are per pixel, (N, H, W) (a segmentation data set, robustlab.data.dense).
    dense: bool = False

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def labels(self) -> torch.Tensor:
        """int64 tensor (N,) of every example's class index."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image ``batch`` returns."""

    @abc.abstractmethod
    def _read(self, positions: range | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...

    @abc.abstractmethod
    def _select(self, positions: range | torch.Tensor) -> "Dataset": ...

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    @property
    def nbytes(self) -> int:
        """Bytes all images take as float32 (N * C * H * W * 4): their size in memory once materialized."""
        c, h, w = self.image_shape
        return len(self) * c * h * w * 4

    @property
    def uniform_size(self) -> bool:
        """True when all images share one size (``batch`` can stack them); see TransformedDataset."""
        return True

    def batch(
        self, indices: range | slice | Sequence[int] | np.ndarray | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 (n, C, H, W) in [0, 1], labels int64 (n,)) at integer positions
        ``indices`` (in order, repeats allowed; a ``range`` or ``slice`` of step 1 is the fast path).
        ``generator`` is handed to random transforms."""
        positions = as_positions(indices, len(self))
        labels = self.labels
        if len(positions) == 0:
            return torch.empty((0, *self.image_shape)), labels[:0]
        y = labels[positions.start : positions.stop] if isinstance(positions, range) else labels[positions]
        return self._read(positions, generator), y

    def batches(self, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield ``(batch_index, start, x, y)`` over consecutive batches, in order; the last may be
        smaller. ``start`` is the position of the batch's first example in the data set."""
        batch_size = _positive_int(batch_size, "batch_size")
        for batch_index, start in enumerate(range(0, len(self), batch_size)):
            x, y = self.batch(range(start, min(start + batch_size, len(self))))
            yield batch_index, start, x, y

    def subset(self, n: int) -> "Dataset":
        """The first ``n`` examples, in order (all of them if ``n`` exceeds the size)."""
        n = _positive_int(n, "subset size n")
        return self._select(range(0, min(n, len(self))))

    def take(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "Dataset":
        """The examples at ``indices`` (integer positions, in the given order, repeats allowed),
        or where a boolean mask of length N is True."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dim() == 1 and idx.dtype == torch.bool:
            if idx.shape[0] != len(self):
                raise RobustlabError(f"a boolean mask must have length {len(self)}, got {idx.shape[0]}")
            idx = torch.nonzero(idx).flatten()
        positions = as_positions(idx, len(self))
        if len(positions) == 0:
            raise RobustlabError("take() selected no examples; a data set needs at least one")
        return self._select(positions)

    def with_transform(self, transform: Callable[..., torch.Tensor]) -> "Dataset":
        """This data set with ``transform`` applied to every batch (see :mod:`robustlab.data.transforms`)."""
        return TransformedDataset(self, transform)

    def materialize(self, batch_size: int = 256, generator: torch.Generator | None = None) -> "ImageDataset":
        """Every image decoded (and transformed) into memory, as an :class:`ImageDataset`; for
        training loops and small sets. Reads ``batch_size`` images at a time."""
        batch_size = _positive_int(batch_size, "batch_size")
        x = torch.empty((len(self), *self.image_shape), dtype=torch.float32)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            x[start:stop] = self._read(range(start, stop), generator)
        return ImageDataset(self.name, self.split, x, self.labels.clone(), list(self.classes))

    def read_images(self, positions: range | Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The images at ``positions`` one by one, each float32 (1, C, H, W); a source of mixed
        image sizes overrides this to give each at its own size (``batch`` cannot stack them)."""
        return [self._read(range(i, i + 1), None) for i in position_list(as_positions(positions, len(self)))]

    def _first_image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first image as ``_read`` gives it (differs from ``image_shape`` only for
        sets of mixed sizes)."""
        return self.image_shape

    def __repr__(self) -> str:
        try:
            shape: object = self.image_shape
        except RobustlabError:
            shape = "mixed"
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={shape}, num_classes={self.num_classes})"
        )


class TensorDataset(Dataset):
    """Images ``x`` (N, C, H, W) and labels ``y`` held as tensors in memory: the accessors the in-memory
    data sets (:class:`ImageDataset`, per-pixel :class:`~robustlab.data.dense.DenseDataset`) share."""

    in_memory = True
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        """int64: (N,) class indices, or (N, H, W) per pixel."""
        return self.y

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def _read(self, positions: range | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.x[positions.start : positions.stop] if isinstance(positions, range) else self.x[positions]

    def materialize(self, batch_size: int = 256, generator: torch.Generator | None = None) -> "TensorDataset":
        """Already in memory: itself."""
        return self


@dataclass(eq=False, repr=False)
class ImageDataset(TensorDataset):
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
        self.classes = check_class_names(self.classes, what)
        if isinstance(self.x, torch.Tensor) and self.x.dim() == 4 and self.x.shape[0] == 0:
            raise RobustlabError(f"{what} has no images")
        check_images(self.x, what=f"{what} images")
        if self.x.dtype != torch.float32:
            raise RobustlabError(f"{what} images must be float32, got {self.x.dtype}; convert with x.float()")
        self.y = check_labels(self.y, int(self.x.shape[0]), len(self.classes), what=f"{what} labels")
        # Loaders permute channels-last files to NCHW; a contiguous layout keeps convolutions on the
        # fast kernels for every batch sliced from here (measured: 1.4x per attack step on MNIST).
        # (.contiguous() is not enough: with one channel a permuted tensor already counts as contiguous.)
        self.x = self.x.clone(memory_format=torch.contiguous_format)

    def batch(
        self, indices: range | slice | Sequence[int] | np.ndarray | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[a:b], y[a:b])`` for ``range(a, b)`` (views, no copy), else ``(x[idx], y[idx])``."""
        if indices.__class__ is range:  # the evaluation runner's call: kept to a few attribute reads
            a, b = indices.start, indices.stop
            if indices.step == 1 and 0 <= a <= b <= self._n:
                return self.x[a:b], self.y[a:b]
        return super().batch(indices, generator)

    def __setattr__(self, key: str, value: object) -> None:
        object.__setattr__(self, key, value)
        if key == "x" and isinstance(value, torch.Tensor) and value.dim() > 0:
            object.__setattr__(self, "_n", int(value.shape[0]))  # the bound batch() checks ranges against

    def _select(self, positions: range | torch.Tensor) -> "ImageDataset":
        if isinstance(positions, range):
            sl = slice(positions.start, positions.stop)
            return ImageDataset(self.name, self.split, self.x[sl], self.y[sl], list(self.classes))
        return ImageDataset(self.name, self.split, self.x[positions], self.y[positions], list(self.classes))


class TransformedDataset(Dataset):
    """``source`` with ``transform`` applied per batch: ``batch(idx)`` reads only those images from
    the source and transforms them. For a source of mixed image sizes (an image folder read
    without ``image_size``) the transform runs image by image and must give one output size."""

    def __init__(self, source: Dataset, transform: Callable[..., torch.Tensor]) -> None:
        if not isinstance(source, Dataset):
            raise RobustlabError(f"a transform applies to a robustlab Dataset, got {type(source).__name__}")
        self.source = source
        self.transform = as_transform(transform)
        self.name, self.split, self.classes = source.name, source.split, source.classes
        self._shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> torch.Tensor:
        return self.source.labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            found = output_shape(self.transform, self.source._first_image_shape())
            if found is None:  # the transform cannot say: run it on the first image
                found = tuple(self._read(range(0, 1), None).shape[1:])  # type: ignore[assignment]
            self._shape = found  # type: ignore[assignment]
        assert self._shape is not None
        return self._shape

    def _read(self, positions: range | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        t = self.transform
        if self.source.uniform_size:
            x = self.source._read(positions, generator)
            return check_transformed(t(x, generator), x.shape[0], t)
        images = self.source.read_images(positions)
        out = [check_transformed(t(x, generator), 1, t) for x in images]
        if len({tuple(o.shape) for o in out}) > 1:
            raise RobustlabError(
                f"transform {t!r} gives images of different sizes for images of different sizes; "
                "end it with a fixed-size step (CenterCrop or Resize)"
            )
        return torch.cat(out) if out else torch.empty((0, *self.image_shape))

    def _select(self, positions: range | torch.Tensor) -> "TransformedDataset":
        selected = TransformedDataset(self.source._select(positions), self.transform)
        selected._shape = self._shape
        return selected

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, transform={self.transform!r})"


def as_positions(indices: object, n: int) -> range | torch.Tensor:
    """Integer positions into a data set of ``n`` examples: a ``range`` of step 1 for a range or
    slice of consecutive positions, else an int64 tensor. Raises for positions outside [0, n)
    (a slice is clipped, as in Python), non-integers and anything not one-dimensional."""
    if isinstance(indices, slice):  # Python's slice semantics (negative from the end, clipped)
        indices = range(*indices.indices(n))
    if isinstance(indices, range):
        if len(indices) == 0:
            return range(0, 0)
        if indices.step == 1:
            if indices.start < 0 or indices.stop > n:
                bad = indices.start if indices.start < 0 else indices.stop - 1
                raise RobustlabError(f"index {bad} is out of range for a data set of {n} examples")
            return indices
        indices = torch.arange(indices.start, indices.stop, indices.step)
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if idx.dim() != 1:
        raise RobustlabError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
    if idx.numel() == 0:  # np.asarray([]) is float64: no positions, whatever the dtype
        return torch.zeros(0, dtype=torch.long)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise RobustlabError(f"indices must be integer positions, got dtype {idx.dtype}")
    idx = idx.long()
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= n:
            bad = int(lo) if int(lo) < 0 else int(hi)
            raise RobustlabError(f"index {bad} is out of range for a data set of {n} examples")
    return idx


def position_list(positions: range | torch.Tensor) -> list[int]:
    """Positions from :func:`as_positions` as a list of ints."""
    return list(positions) if isinstance(positions, range) else positions.tolist()


def check_class_names(classes: object, what: str) -> list[str]:
    """``classes`` as a non-empty list of unique names (str), else a clear error about ``what``."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray)):
        raise RobustlabError(f"{what}: classes must be a list of class names, got {type(classes).__name__}")
    names = [str(c) for c in classes]
    if not names:
        raise RobustlabError(f"{what}: classes is empty; give one name per class")
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise RobustlabError(f"{what}: class names must be unique, repeated: {', '.join(dupes)}")
    return names


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
