"""The data set registry and the one entry point, :func:`load_dataset`."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable

from robustlab.data.dataset import ImageDataset
from robustlab.data.transforms import resize_images
from robustlab.errors import RobustlabError
from robustlab.registry import Registry

#: A loader takes (split, root, image_size) and returns an ImageDataset. ``root`` is None when the
#: caller gave none (file-based loaders then use :func:`robustlab.data.default_data_root`).
DatasetLoader = Callable[[str, "Path | None", "int | None"], ImageDataset]

DATASETS: Registry[DatasetLoader] = Registry("data set")


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return DATASETS.names()


def load_dataset(
    name: str, split: str = "test", root: str | Path | None = None, image_size: int | None = None
) -> ImageDataset:
    """Load split ``split`` of data set ``name`` into memory.

    root: the folder holding the files (default: ``$ROBUSTLAB_DATA``, else ``./data``); for
      ``imagefolder`` the image folder itself. Nothing is ever downloaded.
    image_size: if given, every image is resized to (image_size, image_size) pixels.
    Returns an :class:`ImageDataset` with float32 images (N, C, H, W) in [0, 1] and int64 labels.
    """
    if not isinstance(name, str):
        raise RobustlabError(f"data set name must be a string, got {type(name).__name__}")
    if not isinstance(split, str) or not split:
        raise RobustlabError(f"split must be a non-empty string such as 'test', got {split!r}")
    size = _image_size(image_size)
    loader = DATASETS.get(name.strip().lower().replace("-", "_"))
    dataset = loader(split.strip(), Path(root).expanduser() if root is not None else None, size)
    if size is not None and dataset.image_shape[1:] != (size, size):
        resized = resize_images(dataset.x, size)
        dataset = ImageDataset(dataset.name, dataset.split, resized, dataset.y, dataset.classes)
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
