"""A small but real segmentation data set built from what is on disk: scenes of several MNIST /
Fashion-MNIST (or embedded sklearn digits) objects on a background, labelled per pixel from the
objects' masks.

Scene ``i`` of a split is drawn from its own generator, ``derive_seed(seed, split, i)``, so it is the
same whatever else is rendered (the first n scenes of a larger set are the n scenes of a smaller one).
A scene:

1. a background, one of ``backgrounds`` at random: ``plain`` (one grey level in [0, 0.2]),
   ``noise`` (that level plus uniform noise up to 0.3 per pixel) or ``texture`` (a smooth random
   pattern: a grid of uniform values in [0, 0.4], one per 8 pixels, upsampled bilinearly);
2. ``objects`` (lo..hi, uniform) objects, each a random image of the source's split (train scenes
   from train images, test scenes from test images), resized to a side drawn uniformly from
   ``object_size`` pixels, at a random position that keeps it inside the scene;
3. the overlap rule: a placement is kept only when at most ``max_overlap`` of the new object's mask
   lies on the masks already placed (up to ``PLACEMENT_TRIES`` positions, else the object is left
   out); objects are painted in order, a later one over an earlier one;
4. painting: the object's opacity is ``min(1, 2 * v)`` for its pixel value v in [0, 1], its colour
   ``c * v / max(v)`` with a brightness c uniform in [0.7, 1]; its mask is ``v >= 0.25`` (opacity
   at least 0.5); label = the object's class + 1 under its mask (0 = background), later objects
   overwriting earlier ones where they cover them.

Sources: ``mnist`` and ``fashion_mnist`` (the npz files of the data root, or torchvision's layout:
11 classes), ``mixed`` (either, at random: 21 classes, digits first), ``digits`` (sklearn's 8x8
digits, embedded: needs nothing; for tests and CI).

Registered data sets: ``scenes-mnist``, ``scenes-fashion``, ``scenes-mixed`` (64x64, 2-4 objects of
20-36 pixels) and ``scenes-digits`` (32x32, 1-3 objects of 12-20 pixels); ``image_size`` makes the
scenes at another size (object sizes scale with it). For other settings call :func:`make_scenes`.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robustlab.data.catalog import DATASETS, check_split
from robustlab.data.classes import DIGIT_NAMES, FASHION_MNIST_NAMES
from robustlab.data.dense import DenseDataset
from robustlab.errors import RobustlabError
from robustlab.seeding import derive_seed

BACKGROUNDS = ("plain", "noise", "texture")
SOURCES = ("mnist", "fashion_mnist", "mixed", "digits")
PLACEMENT_TRIES = 10
MASK_THRESHOLD = 0.25  # pixel value (opacity 0.5) from which a pixel belongs to the object
TEXTURE_CELL = 8  # pixels per cell of the texture background's random grid


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are made (see the module docstring). ``n``: scenes per split (train, test)."""

    source: str = "mnist"
    size: int = 64
    objects: tuple[int, int] = (2, 4)
    object_size: tuple[int, int] = (20, 36)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    max_overlap: float = 0.25
    seed: int = 0
    n: tuple[int, int] = (6000, 1000)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise RobustlabError(f"scene source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not 8 <= self.size <= 1024:
            raise RobustlabError(f"scene size must be 8..1024 pixels, got {self.size}")
        lo, hi = self.objects
        if not 0 <= lo <= hi:
            raise RobustlabError(f"objects per scene must be 0 <= lo <= hi, got {self.objects}")
        slo, shi = self.object_size
        if not 2 <= slo <= shi <= self.size:
            raise RobustlabError(f"object sizes must be 2 <= lo <= hi <= the scene size {self.size}, got {self.object_size}")
        bad = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if bad or not self.backgrounds:
            raise RobustlabError(f"backgrounds must be some of {', '.join(BACKGROUNDS)}, got {self.backgrounds}")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise RobustlabError(f"max_overlap must be a fraction in [0, 1], got {self.max_overlap}")

    def at_size(self, size: int) -> SceneSpec:
        """The same scenes at ``size`` pixels (object sizes scaled with it)."""
        f = size / self.size
        lo, hi = (max(2, round(s * f)) for s in self.object_size)
        return replace(self, size=int(size), object_size=(lo, min(max(lo, hi), int(size))))

    def classes(self) -> list[str]:
        """Class names in label order: background first, then the source's classes."""
        names = {"mnist": DIGIT_NAMES, "digits": DIGIT_NAMES, "fashion_mnist": FASHION_MNIST_NAMES,
                 "mixed": DIGIT_NAMES + FASHION_MNIST_NAMES}[self.source]
        return ["background", *names]


#: The registered scene data sets (name -> spec).
SCENE_SETS: dict[str, SceneSpec] = {
    "scenes_mnist": SceneSpec("mnist"),
    "scenes_fashion": SceneSpec("fashion_mnist"),
    "scenes_mixed": SceneSpec("mixed"),
    "scenes_digits": SceneSpec("digits", size=32, objects=(1, 3), object_size=(12, 20), n=(1500, 500)),
}


def make_scenes(spec: SceneSpec, split: str = "test", n: int | None = None, root: Path | None = None,
                name: str | None = None) -> DenseDataset:
    """The first ``n`` scenes (default: the spec's count for the split) of ``split`` made by ``spec``
    from its source's images of that split, as a :class:`DenseDataset` (images (n, 1, S, S),
    labels (n, S, S)). ``root``: the data root of the npz files (see :mod:`robustlab.data.locate`)."""
    spec.validate()
    check_split(name or f"scenes-{spec.source}", split, ("train", "test"))
    count = spec.n[0 if split == "train" else 1] if n is None else int(n)
    if count < 1:
        raise RobustlabError(f"the number of scenes must be >= 1, got {count}")
    pools = _pools(spec.source, split, root, name or f"scenes-{spec.source}")
    key = zlib.crc32(split.encode())
    x = np.empty((count, 1, spec.size, spec.size), dtype=np.float32)
    y = np.empty((count, spec.size, spec.size), dtype=np.int64)
    for i in range(count):
        x[i, 0], y[i] = render_scene(spec, pools, np.random.default_rng(derive_seed(spec.seed, key, i)))
    describe = {"generator": "scenes", **asdict(spec), "split": split, "count": count}
    return DenseDataset(name or f"scenes_{spec.source}", split, torch.from_numpy(x), torch.from_numpy(y),
                        spec.classes(), describe)


def render_scene(spec: SceneSpec, pools: list[tuple[np.ndarray, np.ndarray, int]],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image (S, S) float32 in [0, 1], labels (S, S) int64). ``pools``: per source
    (uint8 images (N, h, w), labels (N,), the label offset of its classes)."""
    s = spec.size
    image = _background(spec.backgrounds[int(rng.integers(len(spec.backgrounds)))], s, rng)
    labels = np.zeros((s, s), dtype=np.int64)
    occupied = np.zeros((s, s), dtype=bool)
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        images, classes, offset = pools[int(rng.integers(len(pools)))]
        j = int(rng.integers(len(images)))
        side = int(rng.integers(spec.object_size[0], spec.object_size[1] + 1))
        v = _resize(images[j], side)
        mask = v >= MASK_THRESHOLD
        area = max(int(mask.sum()), 1)
        brightness = float(rng.uniform(0.7, 1.0))
        for _try in range(PLACEMENT_TRIES):
            top, left = (int(t) for t in rng.integers(0, s - side + 1, size=2))
            window = (slice(top, top + side), slice(left, left + side))
            if (mask & occupied[window]).sum() <= spec.max_overlap * area:
                break
        else:
            continue  # no room for it: left out
        alpha = np.minimum(1.0, 2.0 * v)
        colour = brightness * v / max(float(v.max()), 1e-6)
        image[window] = alpha * colour + (1.0 - alpha) * image[window]
        labels[window][mask] = offset + int(classes[j]) + 1
        occupied[window] |= mask
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def _background(kind: str, s: int, rng: np.random.Generator) -> np.ndarray:
    level = float(rng.uniform(0.0, 0.2))
    if kind == "plain":
        return np.full((s, s), level, dtype=np.float32)
    if kind == "noise":
        return (level + rng.uniform(0.0, 0.3, size=(s, s))).astype(np.float32)
    cells = max(2, -(-s // TEXTURE_CELL) + 1)
    grid = torch.from_numpy(rng.uniform(0.0, 0.4, size=(1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=True)[0, 0].numpy().copy()


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    """A uint8 (h, w) image as float32 (side, side) in [0, 1] (bilinear, antialiased when shrinking)."""
    t = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None]
    if t.shape[-1] == side and t.shape[-2] == side:
        return t[0, 0].numpy()
    out = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=side < t.shape[-1])
    return out[0, 0].clamp(0.0, 1.0).numpy()


def _pools(source: str, split: str, root: Path | None, name: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The object images per source of the scenes: (uint8 (N, h, w), labels (N,), label offset)."""
    if source == "digits":
        from robustlab.data.digits import digits_arrays, digits_split_indices

        pixels, labels = digits_arrays()
        idx = digits_split_indices(labels, split)
        # 0..16 -> 0..255
        return [((pixels[idx].reshape(-1, 8, 8).astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8),
                 labels[idx], 0)]
    names = ["mnist", "fashion_mnist"] if source == "mixed" else [source]
    return [(*_source_arrays(src, split, root, name), 10 * k) for k, src in enumerate(names)]


def _source_arrays(source: str, split: str, root: Path | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, h, w) and labels of a standard grey data set, read once per file."""
    from robustlab.data.locate import resolve_data_root
    from robustlab.data.standard import STANDARD_DATASETS

    data_root, _ = resolve_data_root(root)
    path = data_root / f"{source}_{split}.npz"
    if path.is_file():
        return _read_npz_uint8(str(path), path.stat().st_mtime_ns)
    try:  # torchvision's layout, or the clear error listing every path tried
        data = STANDARD_DATASETS[source].load(split, root)
    except RobustlabError as exc:
        raise RobustlabError(f"data set {name!r} builds its scenes from {source} ({split}), which is missing: "
                             f"{exc}") from None
    x = (data.x[:, 0].numpy() * 255.0).round().astype(np.uint8)
    return x, data.y.numpy()


@functools.lru_cache(maxsize=4)
def _read_npz_uint8(path: str, mtime: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"]
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 1):
        raise RobustlabError(f"{path}: scenes need grey uint8 images (N, H, W[, 1]), got {x.dtype} {x.shape}")
    x = x.reshape(x.shape[:3])
    x.setflags(write=False)
    return x, np.asarray(y, dtype=np.int64)


def _register(key: str, spec: SceneSpec) -> None:
    @DATASETS.register(key)
    def load(split: str, root: Path | None = None, image_size: int | None = None) -> DenseDataset:
        chosen = spec.at_size(image_size) if image_size is not None and image_size != spec.size else spec
        return make_scenes(chosen, split, root=root, name=key)

    load.__doc__ = (f"Scenes of {spec.source} objects ({spec.size}x{spec.size}, {spec.objects[0]}-{spec.objects[1]} "
                    f"objects), {spec.n[0]} train / {spec.n[1]} test; see robustlab.data.scenes.")


for _key, _spec in SCENE_SETS.items():
    _register(_key, _spec)
