"""Corrupted data sets as released: CIFAR-10-C / CIFAR-100-C style ``.npy`` files, MNIST-C folders,
and ImageNet-C / Tiny-ImageNet-C image folders.

Layouts (the folder is ``root`` itself, or ``{root}/{release folder}``: CIFAR-10-C, CIFAR-100-C,
Tiny-ImageNet-C, ImageNet-C, mnist_c):

- **npy** (CIFAR-10-C, CIFAR-100-C, and what ``robustlab corrupt --out`` writes): ``<corruption>.npy``
  uint8 (S*N, H, W, C), severity-major (the first N images are severity 1), and ``labels.npy`` (S*N
  labels, or N);
- **MNIST-C**: ``<corruption>/test_images.npy`` (N, 28, 28, 1) and ``<corruption>/test_labels.npy``, one
  severity;
- **folders** (ImageNet-C, Tiny-ImageNet-C): ``<corruption>/<severity>/<class>/<image>``.

:func:`load_corrupted` gives a :class:`CorruptedDataset`: its ``keys`` (corruption, severity) and each
``slice(c, s)`` as a :class:`~robustlab.data.Dataset` (npy files are memory-mapped and decoded per
batch). The corruption protocol runs on it (``CorruptionProtocol.precorrupted``); plain ``eval``
loads one slice by name: ``load_dataset("cifar10_c", "gaussian_noise:3", root=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustlab.data.arrays import uint8_images_to_tensor
from robustlab.data.catalog import DATASETS
from robustlab.data.classes import default_classes
from robustlab.data.dataset import (
    Dataset,
    ImageDataset,
    check_class_names,
    position_list,
)
from robustlab.data.locate import resolve_data_root
from robustlab.errors import RobustlabError

#: data set name -> (folder name of the release, class names of its clean set or None: from folders)
RELEASES: dict[str, tuple[str, str | None]] = {
    "cifar10_c": ("CIFAR-10-C", "cifar10"),
    "cifar100_c": ("CIFAR-100-C", "cifar100"),
    "tiny_imagenet_c": ("Tiny-ImageNet-C", None),
    "imagenet_c": ("ImageNet-C", None),
    "mnist_c": ("mnist_c", "mnist"),
}
_NOT_CORRUPTIONS = {"labels", "test_labels", "train_labels"}


class NpyImages(Dataset):
    """Rows ``start..stop`` of a uint8 channels-last ``.npy`` (memory-mapped: decoded per batch)."""

    def __init__(self, name: str, split: str, path: Path, start: int, stop: int, labels: torch.Tensor,
                 classes: list[str]) -> None:
        self.name, self.split, self.path = name, split, Path(path)
        self.classes = check_class_names(classes, f"data set {name!r} ({split})")
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if self.array.dtype != np.uint8 or self.array.ndim not in (3, 4):
            raise RobustlabError(f"{self.path}: expected uint8 images (N, H, W[, C]), got {self.array.dtype} "
                                 f"{tuple(self.array.shape)}")
        self.start, self.stop = start, stop
        self._labels = labels.long()
        if len(self._labels) != stop - start:
            raise RobustlabError(f"{self.path}: {stop - start} images but {len(self._labels)} labels")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = self.array.shape
        return (shape[3] if len(shape) == 4 else 1), int(shape[1]), int(shape[2])

    def _read(self, positions, generator):
        idx = np.asarray(position_list(positions), dtype=np.int64) + self.start
        return uint8_images_to_tensor(np.asarray(self.array[idx]), str(self.path))

    def _select(self, positions):
        idx = position_list(positions)
        x = self._read(positions, None)
        return ImageDataset(self.name, self.split, x, self._labels[idx], list(self.classes))


@dataclass
class CorruptedDataset:
    """A released (or written) corrupted set: (corruption, severity) -> a data set of that slice."""

    name: str
    layout: str
    root: str
    keys: list[tuple[str, int]]
    _slice: Callable[[str, int], Dataset]

    def slice(self, corruption: str, severity: int) -> Dataset:
        if (corruption, severity) not in self.keys:
            have = sorted({c for c, _ in self.keys})
            raise RobustlabError(f"{self.name} has no {corruption!r} at severity {severity}; it has "
                                 f"{', '.join(have)} at severities {sorted({s for _, s in self.keys})}")
        return self._slice(corruption, severity)

    def describe(self) -> dict[str, Any]:
        """What the run configuration records about the source."""
        return {"name": self.name, "layout": self.layout, "root": self.root}

    @classmethod
    def from_arrays(cls, name: str, images: dict[tuple[str, int], torch.Tensor], labels: torch.Tensor,
                    classes: list[str]) -> CorruptedDataset:
        """In memory: float images (N, C, H, W) in [0, 1] per (corruption, severity), one label set."""
        sets = {k: ImageDataset(name, f"{k[0]}:{k[1]}", v.float(), labels, list(classes)) for k, v in images.items()}
        return cls(name, "memory", "", list(images), lambda c, s: sets[(c, s)])


def load_corrupted(name: str, root: str | Path | None = None, corruptions: list[str] | None = None,
                   image_size: int | None = None) -> CorruptedDataset:
    """A released corrupted set by data set name (``cifar10_c``, ``cifar100_c``, ``tiny_imagenet_c``,
    ``imagenet_c``, ``mnist_c``), from ``root`` or the data root (see the module docstring);
    ``corruptions``: only these (default: every one found)."""
    key = name.strip().lower().replace("-", "_")
    if key not in RELEASES:
        raise RobustlabError(f"unknown corrupted data set {name!r}; known: {', '.join(sorted(RELEASES))}")
    release, clean_name = RELEASES[key]
    base, source = resolve_data_root(root)
    folder = base / release if (base / release).is_dir() else base
    if not folder.is_dir():
        raise RobustlabError(f"{key}: folder {folder} does not exist (from {source}); robustlab never downloads data")
    found = _find_layout(folder)
    if found is None:
        raise RobustlabError(f"{key}: {folder} holds neither <corruption>.npy with labels.npy (CIFAR-10-C), "
                             "<corruption>/test_images.npy (MNIST-C) nor <corruption>/<severity>/<class>/ image "
                             "folders (ImageNet-C)")
    layout, names = found
    if corruptions is not None:
        missing = [c for c in corruptions if c not in names]
        if missing:
            raise RobustlabError(f"{key}: no {', '.join(missing)} in {folder}; it has {', '.join(names)}")
        names = [c for c in names if c in corruptions]
    classes = default_classes(clean_name) if clean_name else None
    if layout == "npy":
        return _npy_set(key, folder, names, classes)
    if layout == "mnist":
        return _mnist_set(key, folder, names, classes)
    return _folder_set(key, folder, names, image_size)


def _find_layout(folder: Path) -> tuple[str, list[str]] | None:
    npy = sorted(p.stem for p in folder.glob("*.npy") if p.stem not in _NOT_CORRUPTIONS)
    if npy and (folder / "labels.npy").is_file():
        return "npy", npy
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    mnist = [d.name for d in subdirs if (d / "test_images.npy").is_file()]
    if mnist:
        return "mnist", mnist
    folders = [d.name for d in subdirs if any(s.is_dir() and s.name.isdigit() for s in d.iterdir())]
    if folders:
        return "folders", folders
    return None


def _npy_set(name: str, folder: Path, names: list[str], classes: list[str] | None) -> CorruptedDataset:
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    first = np.load(folder / f"{names[0]}.npy", mmap_mode="r", allow_pickle=False)
    total = first.shape[0]
    levels = _levels(folder, labels, total)
    per = total // levels
    if len(labels) not in (total, per):
        raise RobustlabError(f"{folder / 'labels.npy'}: {len(labels)} labels for {total} images per corruption")
    y = torch.as_tensor(np.asarray(labels[:per], dtype=np.int64))
    if classes is None:
        classes = [str(i) for i in range(int(y.max()) + 1)]

    def part(c: str, s: int) -> Dataset:
        a = (s - 1) * per
        lab = torch.as_tensor(np.asarray(labels[a: a + per] if len(labels) == total else labels, dtype=np.int64))
        return NpyImages(name, f"{c}:{s}", folder / f"{c}.npy", a, a + per, lab, classes)

    keys = [(c, s) for c in names for s in range(1, levels + 1)]
    return CorruptedDataset(name, "npy", str(folder), keys, part)


def _levels(folder: Path, labels: np.ndarray, total: int) -> int:
    """How many severities each file stacks: what ``corrupt.json`` (written by robustlab) says, else 5
    when the file splits into five blocks with the same labels (CIFAR-10-C), else 1."""
    manifest = folder / "corrupt.json"
    if manifest.is_file():
        import json

        return len(json.loads(manifest.read_text())["severities"])
    if total % 5 == 0 and len(labels) == total:
        blocks = np.asarray(labels).reshape(5, total // 5)
        if (blocks == blocks[0]).all():
            return 5
    if len(labels) * 5 == total:
        return 5
    return 1


def _mnist_set(name: str, folder: Path, names: list[str], classes: list[str] | None) -> CorruptedDataset:
    def part(c: str, s: int) -> Dataset:
        y = torch.as_tensor(np.load(folder / c / "test_labels.npy", allow_pickle=False).astype(np.int64))
        images = folder / c / "test_images.npy"
        n = len(y)
        return NpyImages(name, f"{c}:{s}", images, 0, n, y, classes or [str(i) for i in range(10)])

    # MNIST-C's folders carry the released names; robustlab's corruptions of them are mnist_<name>
    return CorruptedDataset(name, "mnist-c", str(folder), [(c, 1) for c in names], part)


def _folder_set(name: str, folder: Path, names: list[str], image_size: int | None) -> CorruptedDataset:
    from robustlab.data.image_folder import load_image_folder

    keys = [(c, int(s.name)) for c in names for s in sorted((folder / c).iterdir(), key=lambda p: p.name)
            if s.is_dir() and s.name.isdigit()]

    def part(c: str, s: int) -> Dataset:
        data = load_image_folder("test", folder / c / str(s), image_size)
        data.name, data.split = name, f"{c}:{s}"
        return data

    return CorruptedDataset(name, "folders", str(folder), keys, part)


def _loader(key: str):
    def load(split: str, root: Path | None, image_size: int | None) -> Dataset:
        corruption, _, severity = split.partition(":")
        stored = load_corrupted(key, root, [corruption], image_size)
        levels = sorted(s for c, s in stored.keys if c == corruption)
        if not severity:
            if len(levels) != 1:
                raise RobustlabError(f"{key}: give the severity as split {corruption}:S (S in "
                                     f"{', '.join(map(str, levels))})")
            severity = str(levels[0])
        if not severity.isdigit():
            raise RobustlabError(f"{key}: split must be CORRUPTION:SEVERITY, got {split!r}")
        return stored.slice(corruption, int(severity))

    load.__doc__ = f"One (corruption, severity) slice of {key}: split ``corruption:severity``."
    return load


for _key in RELEASES:
    DATASETS.register(_key)(_loader(_key))
