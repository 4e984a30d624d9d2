"""Image folders: one sub-folder per class, read lazily (decoded per batch).

Layout: ``{root}/{split}/{class}/*.png`` (also jpg, jpeg, bmp, webp, any letter case; sub-folders of a
class are searched too), or, when the root has no split folders at all, ``{root}/{class}/*``. This
covers torchvision's ``ImageFolder`` and the ImageNet layout ``{root}/val/<wnid>/*.JPEG`` (classes
are then the wnids). Classes are the class folder names, sorted; label i is the i-th class. Images
are kept grayscale when every image is grayscale, else all are converted to RGB.

Loading lists the files and reads each file's header (size and colour mode), decoding no pixels;
:class:`ImageFolderDataset` then decodes only the images a ``batch()`` asks for. A file that is not
an image fails at load, one whose pixel data is damaged when it is read; both errors name the file.
``image_size`` resizes every image to (image_size, image_size) at decode (PIL, bilinear); without it
images of different sizes need a transform with a fixed output size (e.g.
:func:`robustlab.data.transforms.resize_center_crop`). Whether ``load_dataset`` keeps a folder
streaming or decodes it into memory is decided there (see :func:`robustlab.data.catalog.load_dataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from robustlab.data.arrays import uint8_images_to_tensor
from robustlab.data.catalog import DATASETS
from robustlab.data.dataset import (
    Dataset,
    as_positions,
    check_class_names,
    position_list,
)
from robustlab.errors import RobustlabError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
COMMON_SPLITS: tuple[str, ...] = ("train", "test", "val", "valid", "validation", "extra")
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})


class ImageFolderDataset(Dataset):
    """Images on disk, decoded per batch: ``batch(indices)`` opens and decodes only those files.

    files: one path per example; labels: int64 (N,); classes: class names in label order;
    channels: 1 (every image grey) or 3 (grey images are repeated to RGB); sizes: int array (N, 2)
    of each file's (height, width); image_size: resize every image to a square of this side at
    decode (PIL bilinear), else images keep their size.
    """

    def __init__(
        self,
        name: str,
        split: str,
        files: Sequence[Path],
        labels: torch.Tensor,
        classes: Sequence[str],
        channels: int,
        sizes: np.ndarray,
        image_size: int | None = None,
    ) -> None:
        self.name, self.split = name, split
        self.classes = check_class_names(classes, f"data set {name!r} ({split})")
        self.files = list(files)
        if not self.files:
            raise RobustlabError(f"data set {name!r} ({split}) has no images")
        self._labels = labels.long()
        self.channels = int(channels)
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self.image_size = image_size
        if not len(self.files) == len(self._labels) == len(self.sizes):
            raise RobustlabError(f"{len(self.files)} files, {len(self._labels)} labels and {len(self.sizes)} sizes")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def uniform_size(self) -> bool:
        return self.image_size is not None or bool((self.sizes == self.sizes[0]).all())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if not self.uniform_size:
            first = self.sizes[0]
            odd = int(np.flatnonzero((self.sizes != first).any(axis=1))[0])
            count = len({tuple(s) for s in self.sizes.tolist()})
            raise RobustlabError(
                f"images have different sizes ({self.files[0].name} is {first[1]}x{first[0]}, "
                f"{self.files[odd].name} is {self.sizes[odd][1]}x{self.sizes[odd][0]}, {count} sizes in all); "
                "pass image_size=... to resize them all to one size, or a transform with a fixed output "
                "size (robustlab.data.transforms.resize_center_crop)"
            )
        return self._shape_of(0)

    def _shape_of(self, i: int) -> tuple[int, int, int]:
        if self.image_size is not None:
            return self.channels, self.image_size, self.image_size
        return self.channels, int(self.sizes[i][0]), int(self.sizes[i][1])

    def _first_image_shape(self) -> tuple[int, int, int]:
        return self._shape_of(0)

    def _decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (H, W, channels), checked against the size its header gave."""
        array = decode_image(self.files[i], self.image_size, self.channels)
        _, h, w = self._shape_of(i)
        if array.shape[:2] != (h, w) or (array.ndim == 3) != (self.channels == 3):
            raise RobustlabError(
                f"{self.files[i]}: decoded {array.shape[1]}x{array.shape[0]} pixels with {array.shape[2] if array.ndim == 3 else 1} "
                f"channel(s), but its header said {w}x{h} with {self.channels}; was it changed after loading?"
            )
        return array if array.ndim == 3 else array[:, :, None]

    def _read(self, positions: range | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        c, h, w = self.image_shape
        order = position_list(positions)
        if not order:
            return torch.empty((0, c, h, w))
        pixels = np.empty((len(order), h, w, c), dtype=np.uint8)
        for k, i in enumerate(order):
            pixels[k] = self._decode(i)
        return uint8_images_to_tensor(pixels, str(self.files[order[0]].parent))

    def read_images(self, positions: range | Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The images at ``positions`` one by one, each float32 (1, C, H, W) at its own size."""
        order = position_list(as_positions(positions, len(self)))
        return [uint8_images_to_tensor(self._decode(i)[None], str(self.files[i])) for i in order]

    def _select(self, positions: range | torch.Tensor) -> ImageFolderDataset:
        order = position_list(positions)
        return ImageFolderDataset(
            self.name, self.split, [self.files[i] for i in order], self._labels[order], self.classes,
            self.channels, self.sizes[order], self.image_size,
        )


@DATASETS.register("imagefolder")
def load_image_folder(split: str, root: Path | None = None, image_size: int | None = None) -> ImageFolderDataset:
    """Split ``split`` of an image folder (see module docstring), streaming: files are listed and
    their headers read, no pixels decoded. ``image_size`` resizes every image to (image_size,
    image_size) pixels at decode, bilinear."""
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
        found = list_images(class_dir)
        if not found:
            raise RobustlabError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "remove it or add images"
            )
        files += found
        labels += [label] * len(found)
    return _folder_dataset("imagefolder", split, files, labels, [d.name for d in class_dirs], image_size)


def list_images(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (sub-folders included, hidden ones skipped), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def folder_to_folder(in_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path, list[Path]]:
    """(source folder, output folder, the source's images) for commands that write a processed copy
    of every image of a folder (perturb, purify); one-line errors for a missing source, an output
    folder inside the source, and a source without images."""
    src, dst = Path(in_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if not src.is_dir():
        raise RobustlabError(f"input folder {src} does not exist or is not a folder")
    if dst == src or src in dst.parents:
        raise RobustlabError(f"output folder {dst} must lie outside the input folder {src}")
    sources = list_images(src)
    if not sources:
        raise RobustlabError(f"no images in {src} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return src, dst, sources


def load_unlabeled_images(folder: str | Path, image_size: int | None = None) -> torch.Tensor:
    """Every image below ``folder`` (any layout; class folders, if any, are ignored), decoded into
    memory as float32 (N, C, H, W) in [0, 1], in sorted path order. ``image_size`` resizes to
    (image_size, image_size) pixels; without it all images must share one size. Grayscale is kept
    when every image is grayscale, else all become RGB."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RobustlabError(f"image folder {folder} does not exist or is not a folder")
    files = list_images(folder)
    if not files:
        raise RobustlabError(f"no images in {folder} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return _folder_dataset("unlabeled", "train", files, [0] * len(files), ["unlabeled"], image_size).materialize().x


def probe_image(path: Path) -> tuple[str, int, int]:
    """(PIL colour mode, height, width) of an image file, from its header only (no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode, int(im.size[1]), int(im.size[0])
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise RobustlabError(f"{path}: cannot read this image ({err})") from None


def decode_image(path: Path, image_size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Decode one image file to uint8: (H, W) if it is grey, else (H, W, 3); with ``channels=3`` a
    grey image is repeated to (H, W, 3). ``image_size`` resizes to a square (PIL bilinear). Errors
    name the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise RobustlabError(f"{path}: cannot read this image ({err})") from None
    if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(im, dtype=np.uint8)
    if channels == 3 and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


#: The name other modules have used for :func:`decode_image` (grey or RGB as the file is).
_read_image = decode_image


def _folder_dataset(
    name: str, split: str, files: list[Path], labels: list[int], classes: list[str], image_size: int | None
) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` of ``files``, with channels and sizes from their headers."""
    probes = [probe_image(p) for p in files]
    channels = 1 if all(mode in _GRAY_MODES for mode, _, _ in probes) else 3
    sizes = np.array([(h, w) for _, h, w in probes], dtype=np.int64)
    y = torch.tensor(labels, dtype=torch.int64)
    return ImageFolderDataset(name, split, files, y, classes, channels, sizes, image_size)


def _split_folder(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    present = [s for s in COMMON_SPLITS if (root / s).is_dir()]
    if present:
        raise RobustlabError(f"image folder {root} has no split {split!r}; found split folders: {', '.join(present)}")
    return root  # no split folders: the root holds the class folders


# ---------------------------------------------------------------------- ImageNet-style validation folders

#: Files that give the class order of an ImageNet-style folder, looked for in the folder and its parent:
#: ``LOC_synset_mapping.txt`` (Kaggle's: "n01440764 tench, Tinca tinca" per line), ``synsets.txt`` (one
#: wnid per line) and ``imagenet_class_index.json`` (Keras': {"0": ["n01440764", "tench"], ...}).
CLASS_ORDER_FILES: tuple[str, ...] = ("LOC_synset_mapping.txt", "synsets.txt", "imagenet_class_index.json")


def read_class_order(path: str | Path) -> list[str]:
    """The class folder names (wnids) in label order from a synset mapping file (see
    ``CLASS_ORDER_FILES``): label i is the i-th name, as the model's output i."""
    import json

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RobustlabError(f"cannot read the class order file {p}: {exc}") from None
    if p.suffix == ".json":
        try:
            index = json.loads(text)
            order = [str(index[str(i)][0]) for i in range(len(index))]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RobustlabError(f"{p} is not a class index ({{\"0\": [\"n01440764\", \"tench\"], ...}})") from None
    else:
        order = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not order:
        raise RobustlabError(f"class order file {p} lists no classes")
    check_class_names(order, f"class order file {p}")
    return order


def find_class_order(folder: Path) -> Path | None:
    """A class order file (``CLASS_ORDER_FILES``) in ``folder`` or its parent, if any."""
    for place in (folder, folder.parent):
        for name in CLASS_ORDER_FILES:
            if (place / name).is_file():
                return place / name
    return None


def with_class_order(data: ImageFolderDataset, order: Sequence[str], source: str = "the class order") -> ImageFolderDataset:
    """The data set with labels renumbered to ``order`` (every class folder must be in it; classes
    without images keep their label): label i means ``order[i]``, e.g. output i of an ImageNet model."""
    position = {name: i for i, name in enumerate(order)}
    unknown = [c for c in data.classes if c not in position]
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise RobustlabError(f"class folder(s) {', '.join(unknown[:3])}{more} are not in {source}")
    remap = torch.tensor([position[c] for c in data.classes], dtype=torch.int64)
    return ImageFolderDataset(data.name, data.split, data.files, remap[data.labels], list(order), data.channels,
                              data.sizes, data.image_size)


@DATASETS.register("imagenet_val")
def load_imagenet_val(split: str, root: Path | None = None, image_size: int | None = None,
                      class_order: str | Path | None = None) -> ImageFolderDataset:
    """An ImageNet-style validation folder, streaming: ``{root}/<wnid>/*.JPEG`` (or ``{root}/val/...``;
    ``split`` is not used). Labels follow ``class_order`` (a file, see :func:`read_class_order`), else
    a class order file found in the folder or its parent, else the sorted folder names (right only
    when every class of the model has a folder). The resize/crop the model expects is applied by
    ``load_dataset(..., transform=transform_for_model(card.preprocessing))``."""
    if root is None:
        raise RobustlabError("data set 'imagenet-val' needs its folder: --data imagenet-val:DIR")
    root = Path(root).expanduser()
    folder = root / "val" if (root / "val").is_dir() else root
    data = load_image_folder("val", folder, image_size)
    data.name = "imagenet-val"
    order_file = Path(class_order) if class_order is not None else find_class_order(folder)
    if order_file is not None:
        data = with_class_order(data, read_class_order(order_file), str(order_file))
    return data


def parse_folder_spec(spec: str) -> tuple[str, Path] | None:
    """``imagenet-val:DIR`` -> ("imagenet-val", DIR); an existing folder path -> ("imagefolder", path);
    anything else (a data set name) -> None."""
    if spec.startswith("imagenet-val:"):
        return "imagenet-val", Path(spec[len("imagenet-val:"):]).expanduser()
    path = Path(spec).expanduser()
    if ("/" in spec or spec.startswith(".")) and path.is_dir():
        return "imagefolder", path
    if "/" in spec and not path.exists():
        raise RobustlabError(f"data folder {spec} does not exist")
    return None


def data_fingerprint(data: object) -> str | None:
    """For a data set read from an image folder (possibly transformed or a subset): 16 hex digits of
    the sha256 of its files' names (relative to their common folder), labels and sizes, so runs on
    two different folders are not taken for runs on the same data. None for other data sets."""
    import hashlib
    import os

    while not isinstance(data, ImageFolderDataset) and hasattr(data, "source"):
        data = data.source
    if not isinstance(data, ImageFolderDataset):
        return None
    base = os.path.commonpath([str(f.parent) for f in data.files]) if data.files else ""
    digest = hashlib.sha256()
    for f, label, (h, w) in zip(data.files, data.labels.tolist(), data.sizes.tolist()):
        digest.update(f"{os.path.relpath(f, base)}\t{label}\t{h}x{w}\n".encode())
    return digest.hexdigest()[:16]
