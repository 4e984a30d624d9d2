"""Turn raw arrays read from files (uint8 channels-last images, integer labels) into tensors.

Every check names the file the arrays came from, so a bad file is easy to find.
"""

from __future__ import annotations

import numpy as np
import torch

from robustlab.errors import RobustlabError


def uint8_images_to_tensor(x: object, source: str) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) with C in {1, 3}, values 0..255, to a float32
    tensor (N, C, H, W) with values in [0, 1]. ``source`` names the file for error messages."""
    if not isinstance(x, np.ndarray):
        raise RobustlabError(f"{source}: images must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise RobustlabError(
            f"{source}: images must be uint8 with values 0..255, got dtype {x.dtype}; "
            "store raw pixel values as uint8"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise RobustlabError(
            f"{source}: images must have shape (N, H, W) or (N, H, W, C), got {tuple(x.shape)}"
        )
    if x.shape[-1] not in (1, 3):
        hint = ""
        if x.shape[1] in (1, 3):
            hint = "; it looks channels-first (N, C, H, W), store channels-last (N, H, W, C)"
        raise RobustlabError(
            f"{source}: images must have 1 (grey) or 3 (RGB) channels last, got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise RobustlabError(f"{source}: holds no images (shape {tuple(x.shape)})")
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    # numpy keeps a permuted (N, 1, H, W) array's strides (it counts as contiguous); the standard
    # layout keeps convolutions on their usual kernels
    return torch.from_numpy(nchw).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def labels_to_tensor(y: object, n: int, num_classes: int, source: str) -> torch.Tensor:
    """Integer labels (N,) (or (N, 1)) with values in [0, num_classes) to an int64 tensor."""
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype.kind not in "iu":
        raise RobustlabError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1:
        raise RobustlabError(f"{source}: labels must have shape (N,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise RobustlabError(f"{source}: {n} images but {y.shape[0]} labels; they must have the same length")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise RobustlabError(
            f"{source}: label {bad} is outside the {num_classes} classes (labels must be 0..{num_classes - 1})"
        )
    return torch.from_numpy(y.astype(np.int64))


def class_names(classes: object, source: str) -> list[str]:
    """A 1-D array or list of class names (str or bytes) to a list of str."""
    arr = np.asarray(classes)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise RobustlabError(f"{source}: classes must be a non-empty 1-D list of names, got shape {arr.shape}")
    names = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in arr.tolist()]
    if len(set(names)) != len(names):
        raise RobustlabError(f"{source}: class names must be unique")
    return names
