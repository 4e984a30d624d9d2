"""Write a corrupted data set to disk in the released CIFAR-10-C layout, resumably.

``write_corrupted(data, names, severities, out)`` writes, for each corruption, ``out/<file>.npy``:
uint8 (S*N, H, W, C), severity-major (the first N images are severity 1), where ``<file>`` is the
released file name (``gaussian_noise``, ..., ``jpeg_compression``; MNIST-C's ``shot_noise``, ...), and
``out/labels.npy`` (S*N labels, int64). ``out/corrupt.json`` records what was written (data set, N,
seed, corruptions, severities).

Resume: a corruption's images go to ``.<file>.npy.partial`` (a memory-mapped .npy) and, after each
finished batch, its count to ``.<file>.progress``; the file gets its final name (an atomic rename)
only when complete. A killed write therefore never leaves a ``<file>.npy`` that is truncated, and a
second call with the same settings continues where it stopped. Each batch is corrupted with a
generator from (seed, corruption, severity, batch), so the files do not depend on where it stopped.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustlab.corruptions.base import CORRUPTIONS, create_corruption
from robustlab.errors import RobustlabError
from robustlab.seeding import make_generator

MANIFEST = "corrupt.json"


def release_file(name: str) -> str:
    """The released file name of a corruption (MNIST-C's without robustlab's ``mnist_`` prefix)."""
    return getattr(CORRUPTIONS.get(name), "release_name", "") or name


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to the temporary name
        np.save(f, array, allow_pickle=False)


def write_corrupted(data: Any, names: list[str], severities: tuple[int, ...] | None, out: str | Path, *, seed: int = 0,
                    batch_size: int = 256, device: torch.device | str = "cpu",
                    status: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
    """Write ``data`` (a :class:`~robustlab.data.Dataset`) under each corruption of ``names`` at
    ``severities`` (None: the corruptions' own, e.g. 1-5, or MNIST-C's one) into ``out`` (see the module docstring). Returns {corruption: file written}.
    ``status(corruption, done, total)`` is told after each batch."""
    out = Path(out)
    n = len(data)
    image_shape = tuple(data.image_shape)
    if severities is None:  # each corruption's own levels, which must agree (one labels.npy serves all)
        levels = {tuple(CORRUPTIONS.get(name).severities) for name in names}
        if len(levels) > 1:
            raise RobustlabError("these corruptions have different numbers of severities (MNIST-C's have one); write "
                                 "them to different folders or give --severities")
        severities = levels.pop()
    severities = tuple(severities)
    # every corruption must take every severity asked and these images, before anything is written
    for name in names:
        for s in severities:
            create_corruption(name, s).table_entry(min(image_shape[1:]))
    files = [release_file(name) for name in names]
    if len(set(files)) != len(files):
        raise RobustlabError("two corruptions asked for have the same released file name; write them to different "
                             "folders")
    manifest = {"dataset": data.name, "split": data.split, "n": n, "image_shape": list(image_shape), "seed": seed,
                "severities": list(severities), "batch_size": batch_size}
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        same = {k: v for k, v in old.items() if k != "corruptions"} == manifest
        if not same:
            raise RobustlabError(f"{out} holds a corrupted set written with other settings ({old.get('dataset')}, "
                                 f"n={old.get('n')}, seed={old.get('seed')}, severities {old.get('severities')}); "
                                 "give another --out")
        done_names = list(old.get("corruptions", []))
    else:
        done_names = []
    labels = data.labels.numpy().astype(np.int64)
    labels_path = out / "labels.npy"
    if not labels_path.is_file():
        _atomic_write(labels_path, lambda p: _save_npy(p, np.tile(labels, len(severities))))
    written = {}
    for name, file in zip(names, files):
        final = out / f"{file}.npy"
        if final.is_file() and name in done_names:
            written[name] = final
            continue
        _write_one(data, name, file, severities, out, seed, batch_size, torch.device(device), status)
        done_names.append(name)
        _atomic_write(path, lambda p: p.write_text(json.dumps({**manifest, "corruptions": done_names}, indent=1)))
        written[name] = final
    if not path.is_file():
        _atomic_write(path, lambda p: p.write_text(json.dumps({**manifest, "corruptions": done_names}, indent=1)))
    return written


def _write_one(data, name: str, file: str, severities, out: Path, seed: int, bs: int, device: torch.device,
               status) -> None:
    n = len(data)
    c, h, w = data.image_shape
    partial = out / f".{file}.npy.partial"
    progress = out / f".{file}.progress"
    done = 0
    if partial.is_file() and progress.is_file():
        done = int(json.loads(progress.read_text())["done"])
        images = np.lib.format.open_memmap(partial, mode="r+")
        if images.shape != (len(severities) * n, h, w, c):
            done, images = 0, None
    else:
        images = None
    if images is None:
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(severities) * n, h, w, c))
    per_severity = (n + bs - 1) // bs
    total = per_severity * len(severities)
    key = zlib.crc32(name.encode())
    for k, s in enumerate(severities):
        corruption = create_corruption(name, s)
        for b in range(per_severity):
            step = k * per_severity + b
            if step < done:
                continue
            a, z = b * bs, min((b + 1) * bs, n)
            x, _ = data.batch(range(a, z))
            gen = make_generator(seed, key, s, b, device=device)
            images[k * n + a: k * n + z] = _to_uint8(corruption(x.to(device), generator=gen))
            images.flush()
            _atomic_write(progress, lambda p, d=step + 1: p.write_text(json.dumps({"done": d})))
            if status is not None:
                status(name, step + 1, total)
    del images
    os.replace(partial, out / f"{file}.npy")
    progress.unlink(missing_ok=True)
