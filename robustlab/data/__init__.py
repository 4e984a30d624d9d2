"""Data sets: embedded digits, npz files, torchvision's on-disk layouts, image folders.

``load_dataset(name, split, root=None, image_size=None, *, transform=None, stream=None)`` returns a
:class:`Dataset`: ``len(data)``, ``name``, ``split``, ``classes``, ``num_classes``, ``image_shape``,
``labels`` and ``batch(indices) -> (x, y)`` with float32 images (n, C, H, W) in [0, 1] and int64
labels. Small sets come as an in-memory :class:`ImageDataset` (with ``x`` and ``y``); large image
folders stream, decoded per batch. Transforms (resize + crop, corruptions) apply per batch. Files
are read from ``root``, else ``$ROBUSTLAB_DATA``, else ``./data``; nothing is ever downloaded.
"""

from robustlab.data.catalog import DATASETS, EAGER_LIMIT_BYTES, list_datasets, load_dataset
from robustlab.data.dataset import Dataset, ImageDataset, TransformedDataset
from robustlab.data.dense import DenseDataset, is_dense
from robustlab.data.locate import default_data_root
from robustlab.data.transforms import (
    CenterCrop,
    Compose,
    Resize,
    ResizeShorter,
    Transform,
    resize_center_crop,
    transform_for_model,
)

# Importing these modules registers their loaders in DATASETS.
from robustlab.data import corrupted as _corrupted  # noqa: E402,F401
from robustlab.data import digits as _digits  # noqa: E402,F401
from robustlab.data import image_folder as _image_folder  # noqa: E402,F401
from robustlab.data import scenes as _scenes  # noqa: E402,F401
from robustlab.data import standard as _standard  # noqa: E402,F401
from robustlab.data.image_folder import ImageFolderDataset  # noqa: E402

__all__ = [
    "DATASETS", "EAGER_LIMIT_BYTES", "CenterCrop", "Compose", "Dataset", "DenseDataset", "ImageDataset", "ImageFolderDataset",
    "Resize", "ResizeShorter", "Transform", "TransformedDataset", "default_data_root", "list_datasets",
    "is_dense", "load_dataset", "resize_center_crop", "transform_for_model",
]
