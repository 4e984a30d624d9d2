"""Read data sets from the folders torchvision leaves on disk (never downloading anything).

Each ``read_*`` function looks for its files under a data root, appends every path it checked to
``tried``, returns ``None`` when the layout is absent, raises :class:`RobustlabError` when it is
present but incomplete or damaged, and otherwise returns ``(x, y, classes)`` with x float32
(N, C, H, W) in [0, 1] and y int64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustlab.data.arrays import class_names, labels_to_tensor, uint8_images_to_tensor
from robustlab.data.idx import read_idx
from robustlab.data.safe_pickle import load_restricted_pickle
from robustlab.errors import RobustlabError

Loaded = tuple[torch.Tensor, torch.Tensor, list[str]]

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"


def mnist_raw_files(root: Path, folder: str, split: str) -> tuple[list[Path], list[Path]]:
    """Candidate (images, labels) paths of torchvision's MNIST-style ``{folder}/raw`` layout."""
    prefix = "train" if split == "train" else "t10k"
    raw = root / folder / "raw"
    images = [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-images-idx3-ubyte.gz"]
    labels = [raw / f"{prefix}-labels-idx1-ubyte", raw / f"{prefix}-labels-idx1-ubyte.gz"]
    return images, labels


def read_mnist_raw(root: Path, folder: str, split: str, classes: list[str], tried: list[Path]) -> Loaded | None:
    """MNIST / FashionMNIST: ``{root}/{folder}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    image_paths, label_paths = mnist_raw_files(root, folder, split)
    tried += image_paths + label_paths
    images = _first_file(image_paths)
    labels = _first_file(label_paths)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, lack = (images, label_paths) if labels is None else (labels, image_paths)
        raise RobustlabError(f"found {have} but not its partner; expected one of: {', '.join(map(str, lack))}")
    x_np = read_idx(images)
    if x_np.dtype != np.uint8 or x_np.ndim != 3:
        raise RobustlabError(f"{images}: expected uint8 images (N, H, W), got {x_np.dtype} {x_np.shape}")
    y_np = read_idx(labels)
    if y_np.ndim != 1:
        raise RobustlabError(f"{labels}: expected labels (N,), got shape {y_np.shape}")
    x = uint8_images_to_tensor(x_np, str(images))
    y = labels_to_tensor(y_np, int(x.shape[0]), len(classes), f"{labels} (with {images.name})")
    return x, y, list(classes)


def cifar_files(root: Path, which: str, split: str) -> tuple[list[Path], Path]:
    """(batch files, meta file) of the torchvision CIFAR-10 (``which="cifar10"``) or CIFAR-100 layout."""
    if which == "cifar10":
        folder = root / CIFAR10_DIR
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [folder / n for n in names], folder / "batches.meta"
    folder = root / CIFAR100_DIR
    return [folder / split], folder / "meta"


def read_cifar(root: Path, which: str, split: str, classes: list[str], tried: list[Path]) -> Loaded | None:
    """CIFAR-10 ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` or CIFAR-100
    ``cifar-100-python/{train,test}`` python pickles, read with the restricted unpickler."""
    batches, meta = cifar_files(root, which, split)
    tried += batches
    present = [p for p in batches if p.is_file()]
    if not present:
        return None
    if len(present) != len(batches):
        lacking = [str(p) for p in batches if not p.is_file()]
        raise RobustlabError(f"incomplete {which} folder {batches[0].parent}: missing {', '.join(lacking)}")
    label_key = "labels" if which == "cifar10" else "fine_labels"
    if meta.is_file():
        meta_dict = _as_dict(load_restricted_pickle(meta), meta)
        names_key = "label_names" if which == "cifar10" else "fine_label_names"
        classes = class_names(_entry(meta_dict, names_key, meta), f"{meta} ({names_key})")
    xs, ys = [], []
    for path in batches:
        batch = _as_dict(load_restricted_pickle(path), path)
        data = np.asarray(_entry(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise RobustlabError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        x = uint8_images_to_tensor(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), str(path))
        labels = np.asarray(_entry(batch, label_key, path))
        xs.append(x)
        ys.append(labels_to_tensor(labels, int(x.shape[0]), len(classes), str(path)))
    return torch.cat(xs), torch.cat(ys), classes


def svhn_files(root: Path, split: str) -> list[Path]:
    """Candidate paths of torchvision's SVHN file ``{split}_32x32.mat`` (in the root or ``svhn/``)."""
    name = f"{split}_32x32.mat"
    return [root / name, root / "svhn" / name]


def read_svhn(root: Path, split: str, classes: list[str], tried: list[Path]) -> Loaded | None:
    """SVHN ``{split}_32x32.mat``: X uint8 (32, 32, 3, N), y (N, 1) in 1..10 where 10 means digit 0."""
    paths = svhn_files(root, split)
    tried += paths
    path = _first_file(paths)
    if path is None:
        return None
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (NotImplementedError, ValueError, OSError, TypeError) as err:
        raise RobustlabError(f"{path}: not a readable MATLAB (v5) SVHN file ({err})") from None
    if "X" not in mat or "y" not in mat:
        raise RobustlabError(f"{path}: must hold variables X and y")
    x_np, y_np = mat["X"], np.asarray(mat["y"])
    if x_np.dtype != np.uint8 or x_np.ndim != 4 or x_np.shape[2] != 3:
        raise RobustlabError(f"{path}: X must be uint8 (H, W, 3, N), got {x_np.dtype} {x_np.shape}")
    x = uint8_images_to_tensor(np.ascontiguousarray(x_np.transpose(3, 0, 1, 2)), str(path))
    y_np = y_np.reshape(-1) if y_np.ndim == 2 and 1 in y_np.shape else y_np
    if y_np.dtype.kind not in "iuf":
        raise RobustlabError(f"{path}: y must hold digit labels 1..10, got dtype {y_np.dtype}")
    if y_np.dtype.kind == "f":
        if not np.all(np.isfinite(y_np)) or not np.all(y_np == np.round(y_np)):
            raise RobustlabError(f"{path}: y must hold whole-number digit labels 1..10")
        y_np = y_np.astype(np.int64)
    y_np = np.where(y_np == 10, 0, y_np).astype(np.int64)
    y = labels_to_tensor(y_np, int(x.shape[0]), len(classes), str(path))
    return x, y, list(classes)


def _first_file(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _as_dict(obj: Any, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise RobustlabError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _entry(d: dict, key: str, path: Path) -> Any:
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise RobustlabError(f"{path}: missing entry {key!r}")
