"""The standard benchmark data sets, read from a data folder: an npz file or torchvision's layout.

For data set ``name`` and split ``split`` under the data root, the first layout found is used:

1. ``{root}/{name}_{split}.npz`` with ``x`` uint8 (N, H, W[, C]), ``y`` integers (N,), optional
   ``classes`` (str array);
2. the folder torchvision leaves on disk (see :mod:`robustlab.data.torchvision_layout`).

If neither is there, one error lists every path tried. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from robustlab.data import torchvision_layout as tv
from robustlab.data.catalog import DATASETS, check_split
from robustlab.data.classes import default_classes
from robustlab.data.dataset import ImageDataset
from robustlab.data.locate import missing_dataset_error, resolve_data_root
from robustlab.data.npz import read_npz

NPZ_LAYOUT = "{name}_{split}.npz in the data root: x uint8 (N, H, W) or (N, H, W, C), y int64 (N,), optional classes"

# (root, split, classes, tried) -> (x, y, classes) or None when absent
TorchvisionReader = Callable[[Path, str, list[str], list[Path]], "tv.Loaded | None"]


@dataclass(frozen=True)
class StandardDataset:
    """How to find one standard data set on disk."""

    name: str
    splits: tuple[str, ...]
    torchvision_layout: str
    read_torchvision: TorchvisionReader

    def load(self, split: str, root: Path | None = None, image_size: int | None = None) -> ImageDataset:
        """Read split ``split`` from the data root (see module docstring)."""
        check_split(self.name, split, self.splits)
        data_root, source = resolve_data_root(root)
        classes = default_classes(self.name)
        npz_path = data_root / f"{self.name}_{split}.npz"
        tried = [npz_path]
        if npz_path.is_file():
            loaded = read_npz(npz_path, classes)
        else:
            loaded = self.read_torchvision(data_root, split, classes, tried)
        if loaded is None:
            layouts = [NPZ_LAYOUT.format(name=self.name, split=split), self.torchvision_layout]
            raise missing_dataset_error(self.name, split, data_root, source, tried, layouts)
        x, y, names = loaded
        return ImageDataset(self.name, split, x, y, names)


STANDARD_DATASETS: dict[str, StandardDataset] = {
    spec.name: spec
    for spec in (
        StandardDataset(
            "mnist", ("train", "test"),
            "torchvision MNIST: MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz] and -labels-idx1-ubyte[.gz]",
            lambda root, split, classes, tried: tv.read_mnist_raw(root, "MNIST", split, classes, tried),
        ),
        StandardDataset(
            "fashion_mnist", ("train", "test"),
            "torchvision FashionMNIST: FashionMNIST/raw/{train,t10k}-images-idx3-ubyte[.gz] and "
            "-labels-idx1-ubyte[.gz]",
            lambda root, split, classes, tried: tv.read_mnist_raw(root, "FashionMNIST", split, classes, tried),
        ),
        StandardDataset(
            "cifar10", ("train", "test"),
            f"torchvision CIFAR10: {tv.CIFAR10_DIR}/data_batch_1..5 (train), test_batch (test), batches.meta",
            lambda root, split, classes, tried: tv.read_cifar(root, "cifar10", split, classes, tried),
        ),
        StandardDataset(
            "cifar100", ("train", "test"),
            f"torchvision CIFAR100: {tv.CIFAR100_DIR}/train, test, meta (fine labels)",
            lambda root, split, classes, tried: tv.read_cifar(root, "cifar100", split, classes, tried),
        ),
        StandardDataset(
            "svhn", ("train", "test", "extra"),
            "torchvision SVHN: {split}_32x32.mat in the data root or in svhn/",
            tv.read_svhn,
        ),
    )
}

for _spec in STANDARD_DATASETS.values():
    DATASETS.register(_spec.name)(_spec.load)
