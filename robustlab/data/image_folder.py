"""A generic loader for a folder of images sorted into one sub-folder per class.

Layout: ``{root}/{split}/{class}/*.png`` (also jpg, jpeg, bmp, webp; sub-folders of a class are
searched too), or, when the root has no split folders at all, ``{root}/{class}/*``. Classes are
the class folder names, sorted; label i is the i-th class. Images are kept grayscale when every
image is grayscale, else all are converted to RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustlab.data.arrays import uint8_images_to_tensor
from robustlab.data.catalog import DATASETS
from robustlab.data.dataset import ImageDataset
from robustlab.errors import RobustlabError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
COMMON_SPLITS: tuple[str, ...] = ("train", "test", "val", "valid", "validation", "extra")
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})


@DATASETS.register("imagefolder")
def load_image_folder(split: str, root: Path | None = None, image_size: int | None = None) -> ImageDataset:
    """Read split ``split`` of an image folder (see module docstring). ``image_size`` resizes every
    image to (image_size, image_size) pixels, bilinear; without it all images must share one size."""
    if root is None:
        raise RobustlabError("data set 'imagefolder' needs root=<folder>, the folder holding the images")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise RobustlabError(f"image folder {root} does not exist or is not a folder")
    folder = _split_folder(root, split)
    class_dirs = sorted(
        (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not class_dirs:
        raise RobustlabError(
            f"no class folders in {folder}; expected {root}/{split}/<class>/*.png or {root}/<class>/*.png "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            and p.is_file()
        )
        if not found:
            raise RobustlabError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "remove it or add images"
            )
        files += found
        labels += [label] * len(found)
    arrays = [_read_image(p, image_size) for p in files]
    x_np = _stack(arrays, files)
    x = uint8_images_to_tensor(x_np, str(folder))
    y = np.asarray(labels, dtype=np.int64)
    return ImageDataset("imagefolder", split, x, torch.from_numpy(y), [d.name for d in class_dirs])


def list_images(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (sub-folders included, hidden ones skipped), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_unlabeled_images(folder: str | Path, image_size: int | None = None) -> torch.Tensor:
    """Every image below ``folder`` (any layout; class folders, if any, are ignored), as float32
    (N, C, H, W) in [0, 1], in sorted path order. ``image_size`` resizes to (image_size,
    image_size) pixels; without it all images must share one size. Grayscale is kept when every
    image is grayscale, else all become RGB."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RobustlabError(f"image folder {folder} does not exist or is not a folder")
    files = list_images(folder)
    if not files:
        raise RobustlabError(f"no images in {folder} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return uint8_images_to_tensor(_stack([_read_image(p, image_size) for p in files], files), str(folder))


def _split_folder(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    present = [s for s in COMMON_SPLITS if (root / s).is_dir()]
    if present:
        raise RobustlabError(f"image folder {root} has no split {split!r}; found split folders: {', '.join(present)}")
    return root  # no split folders: the root holds the class folders


def _read_image(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise RobustlabError(f"{path}: cannot read this image ({err})") from None
    if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _stack(arrays: list[np.ndarray], files: list[Path]) -> np.ndarray:
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        odd = next(i for i, a in enumerate(arrays) if a.shape[:2] != first)
        raise RobustlabError(
            f"images have different sizes ({files[0].name} is {first[1]}x{first[0]}, "
            f"{files[odd].name} is {arrays[odd].shape[1]}x{arrays[odd].shape[0]}, {len(sizes)} sizes in all); "
            "pass image_size=... to resize them all to one size"
        )
    if any(a.ndim == 3 for a in arrays):  # some RGB: make every image RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    return np.stack(arrays)
