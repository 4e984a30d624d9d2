"""Read a data set split from a NumPy ``.npz`` archive (never unpickling anything)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from robustlab.data.arrays import class_names, labels_to_tensor, uint8_images_to_tensor
from robustlab.errors import RobustlabError


def read_npz(path: Path, default_classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``x`` (uint8 (N, H, W) or (N, H, W, C)), ``y`` (integers (N,)) and the optional ``classes``
    (str array) from ``path``; other arrays are ignored. Returns (x float32 NCHW in [0, 1], y int64,
    class names). Without ``classes`` in the file, ``default_classes`` are used."""
    source = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise RobustlabError(f"{source}: not a readable .npz archive ({err})") from None
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise RobustlabError(
                f"{source}: missing array(s) {', '.join(missing)}; an npz data file needs x (uint8 images) "
                f"and y (integer labels), found {', '.join(archive.files) or 'nothing'}"
            )
        x_np = _array(archive, "x", source)
        y_np = _array(archive, "y", source)
        if "classes" in archive.files:
            classes = class_names(_array(archive, "classes", source), f"{source} (classes)")
        elif default_classes is not None:
            classes = list(default_classes)
        else:
            raise RobustlabError(f"{source}: no classes array and no default class names for this data set")
    x = uint8_images_to_tensor(x_np, source)
    y = labels_to_tensor(y_np, int(x.shape[0]), len(classes), source)
    return x, y, classes


def _array(archive: np.lib.npyio.NpzFile, key: str, source: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:  # object arrays need pickle, which is refused
        raise RobustlabError(
            f"{source}: array {key!r} cannot be read without unpickling ({err}); store it as a plain "
            "numeric or str array"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise RobustlabError(f"{source}: array {key!r} is damaged ({err})") from None
