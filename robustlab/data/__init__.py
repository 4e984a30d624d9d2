"""Data sets: embedded digits, npz files, torchvision's on-disk layouts, image folders.

``load_dataset(name, split, root=None, image_size=None)`` returns an :class:`ImageDataset` with float32
images (N, C, H, W) in [0, 1] and int64 labels. Files are read from ``root``, else ``$ROBUSTLAB_DATA``,
else ``./data``; nothing is ever downloaded.
"""

from robustlab.data.catalog import DATASETS, list_datasets, load_dataset
from robustlab.data.dataset import ImageDataset
from robustlab.data.locate import default_data_root

# Importing these modules registers their loaders in DATASETS.
from robustlab.data import digits as _digits  # noqa: E402,F401
from robustlab.data import image_folder as _image_folder  # noqa: E402,F401
from robustlab.data import standard as _standard  # noqa: E402,F401

__all__ = ["DATASETS", "ImageDataset", "default_data_root", "list_datasets", "load_dataset"]
