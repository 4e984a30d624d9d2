"""The data set registry and the one entry point, :func:`load_dataset`."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable

import torch

from robustlab.data.dataset import Dataset
from robustlab.data.transforms import Resize
from robustlab.errors import RobustlabError
from robustlab.registry import Registry

#: A loader takes (split, root, image_size) and returns a Dataset: an in-memory ImageDataset for
#: array files, a streaming one for image folders. ``root`` is None when the caller gave none
#: (file-based loaders then use :func:`robustlab.data.default_data_root`).
DatasetLoader = Callable[[str, "Path | None", "int | None"], Dataset]

DATASETS: Registry[DatasetLoader] = Registry("data set")

#: With ``stream=None``, a data set that is not already in memory is decoded into memory at load
#: when its float32 images take at most this many bytes, and streams (decoded per batch) otherwise.
EAGER_LIMIT_BYTES = 256 * 2**20


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return DATASETS.names()


def load_dataset(
    name: str,
    split: str = "test",
    root: str | Path | None = None,
    image_size: int | None = None,
    *,
    transform: Callable[..., torch.Tensor] | None = None,
    stream: bool | None = None,
) -> Dataset:
    """Load split ``split`` of data set ``name``.

    root: the folder holding the files (default: ``$ROBUSTLAB_DATA``, else ``./data``); for
      ``imagefolder`` the image folder itself. Nothing is ever downloaded.
    image_size: if given, every image is resized to (image_size, image_size) pixels.
    transform: applied per batch after that (see :mod:`robustlab.data.transforms`), e.g.
      ``resize_center_crop(224, crop_pct=0.875)``.
    stream: where the images live. ``False``: decoded (and transformed) into memory now, an
      :class:`ImageDataset`. ``True``: nothing is decoded at load; image folders are decoded and
      transforms applied batch by batch (array files are read into memory as they are). ``None``
      (default): in memory if the float32 images take at most ``EAGER_LIMIT_BYTES`` (256 MiB; for
      example 1,300 RGB images of 224x224 or 65,000 of 32x32), else streaming.
    Returns a :class:`Dataset`: ``batch(indices)`` gives float32 images (n, C, H, W) in [0, 1] and
    int64 labels; only an in-memory :class:`ImageDataset` has ``x`` and ``y``.
    """
    if not isinstance(name, str):
        raise RobustlabError(f"data set name must be a string, got {type(name).__name__}")
    if not isinstance(split, str) or not split:
        raise RobustlabError(f"split must be a non-empty string such as 'test', got {split!r}")
    if stream not in (None, True, False):
        raise RobustlabError(f"stream must be True, False or None (decide by size), got {stream!r}")
    size = _image_size(image_size)
    loader = DATASETS.get(name.strip().lower().replace("-", "_"))
    dataset = loader(split.strip(), Path(root).expanduser() if root is not None else None, size)
    if size is not None and dataset.uniform_size and dataset.image_shape[1:] != (size, size):
        dataset = dataset.with_transform(Resize(size))
    if transform is not None:
        dataset = dataset.with_transform(transform)
    nbytes = dataset.nbytes  # also the clear error for images of mixed sizes without a resize
    if stream is False or (stream is None and not dataset.in_memory and nbytes <= EAGER_LIMIT_BYTES):
        return dataset.materialize()
    return dataset


def check_split(name: str, split: str, splits: tuple[str, ...]) -> str:
    """Return ``split`` if data set ``name`` has it, else raise an error listing its splits."""
    if split not in splits:
        raise RobustlabError(f"data set {name!r} has no split {split!r}; choose one of: {', '.join(splits)}")
    return split


def _image_size(image_size: object) -> int | None:
    if image_size is None:
        return None
    try:
        if isinstance(image_size, bool):
            raise TypeError
        size = operator.index(image_size)  # type: ignore[arg-type]
    except TypeError:
        raise RobustlabError(f"image_size must be a positive integer (pixels), got {image_size!r}") from None
    if size < 1:
        raise RobustlabError(f"image_size must be a positive integer (pixels), got {size}")
    return size
