"""scikit-learn's bundled 8x8 handwritten digits (1,797 images; shipped inside sklearn, no download)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from robustlab.data.catalog import DATASETS, check_split
from robustlab.data.classes import default_classes
from robustlab.data.dataset import ImageDataset

#: Every TEST_EVERY-th example of each class (in sklearn's order) goes to the test split.
TEST_EVERY = 4


def digits_split_indices(y: np.ndarray, split: str) -> np.ndarray:
    """Positions of ``split`` in the fixed stratified split: within each class, in original order,
    positions 3, 7, 11, ... (every 4th, about 25%) are test and the rest train. Sorted ascending;
    no random numbers are involved, so it never changes."""
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        is_test[members[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (1797, 64) in 0..16, labels int64 (1797,)), in sklearn's order. Read straight
    from the CSV sklearn ships (importing sklearn costs seconds); falls back to
    ``sklearn.datasets.load_digits`` if that file is not where expected. Cached; do not modify."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            with gzip.open(csv, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
            if table.shape == (1797, 65):
                pixels, labels = table[:, :64].astype(np.uint8), table[:, 64]
                break
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data.astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


@DATASETS.register("digits")
def load_digits_dataset(split: str, root: Path | None = None, image_size: int | None = None) -> ImageDataset:
    """Split ``"train"`` (1,352 images) or ``"test"`` (445) of the sklearn digits: (1, 8, 8), pixel
    values 0..16 divided by 16. ``root`` is ignored (the data are embedded)."""
    check_split("digits", split, ("train", "test"))
    pixels, labels = digits_arrays()
    idx = digits_split_indices(labels, split)
    x = torch.from_numpy(pixels[idx].reshape(-1, 1, 8, 8).astype(np.float32) / np.float32(16.0))
    return ImageDataset("digits", split, x, torch.from_numpy(labels[idx].copy()), default_classes("digits"))
