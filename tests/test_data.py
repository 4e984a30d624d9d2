"""Tests for robustlab.data: the dataset container, every loader and layout, and the real files."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.data import (
    DATASETS,
    CenterCrop,
    Dataset,
    ImageDataset,
    ImageFolderDataset,
    Resize,
    ResizeShorter,
    TransformedDataset,
    default_data_root,
    list_datasets,
    load_dataset,
    resize_center_crop,
    transform_for_model,
)
from robustlab.data.digits import digits_arrays, digits_split_indices
from robustlab.data.safe_pickle import load_restricted_pickle
from robustlab.errors import RobustlabError


def _shared_data() -> Path:
    env = os.environ.get("ROBUSTLAB_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(
    not (SHARED / "mnist_test.npz").is_file(),
    reason=f"shared benchmark data not found at {SHARED} (set ROBUSTLAB_SHARED_DATA to its folder)",
)


def _rng_images(n: int, h: int, w: int, c: int | None, seed: int = 0) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _as_nchw_float(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


# --------------------------------------------------------------------------- registry and API


def test_registry_lists_every_loader():
    assert list_datasets() == ["cifar10", "cifar100", "cifar100_c", "cifar10_c", "digits", "fashion_mnist", "imagefolder",
                               "imagenet_c", "imagenet_val", "mnist", "mnist_c", "scenes_digits", "scenes_fashion",
                               "scenes_mixed", "scenes_mnist", "svhn", "tiny_imagenet_c"]
    assert list_datasets() == DATASETS.names()


def test_unknown_dataset_lists_known_names():
    with pytest.raises(RobustlabError, match=r"unknown data set 'imagenet'.*cifar10.*mnist"):
        load_dataset("imagenet")


def test_bad_image_size_and_split_are_rejected():
    with pytest.raises(RobustlabError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(RobustlabError, match="image_size"):
        load_dataset("digits", image_size=True)
    with pytest.raises(RobustlabError, match=r"no split 'val'.*train, test"):
        load_dataset("digits", "val")


# --------------------------------------------------------------------------- digits


# sha256 of sklearn's digits pixels (uint8) followed by the labels (int64), in sklearn's order
DIGITS_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"


def test_digits_source_is_sklearns_bundled_set():
    pixels, labels = digits_arrays()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    digest = hashlib.sha256(pixels.astype(np.uint8).tobytes() + labels.astype(np.int64).tobytes()).hexdigest()
    assert digest == DIGITS_SHA256
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_split_is_fixed_stratified_and_disjoint():
    pixels, y_all = digits_arrays()
    train_idx = digits_split_indices(y_all, "train")
    test_idx = digits_split_indices(y_all, "test")
    assert len(set(train_idx) & set(test_idx)) == 0
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(len(y_all)))
    # every 4th example of each class, in sklearn's order
    for c in range(10):
        members = np.flatnonzero(y_all == c)
        assert set(test_idx[y_all[test_idx] == c]) == set(members[3::4])

    train, test = load_digits_both()
    assert (len(train), len(test)) == (1352, 445)
    assert train.image_shape == test.image_shape == (1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.classes == [str(i) for i in range(10)]
    for ds, idx in ((train, train_idx), (test, test_idx)):
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
        expected = torch.from_numpy(pixels[idx].reshape(-1, 1, 8, 8).astype(np.float32) / 16)
        assert torch.equal(ds.x, expected)
        assert torch.equal(ds.y, torch.from_numpy(y_all[idx]).long())
    # no image is in both splits (by content, not only by position)
    train_rows = {bytes(r) for r in pixels[train_idx]}
    assert not any(bytes(r) in train_rows for r in pixels[test_idx])
    # stratified: each class is 22-26% test
    test_counts = torch.bincount(test.y, minlength=10).double()
    frac = test_counts / (test_counts + torch.bincount(train.y, minlength=10).double())
    assert bool(((frac > 0.22) & (frac < 0.26)).all()), frac
    # deterministic
    again = load_dataset("digits", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


def load_digits_both() -> tuple[ImageDataset, ImageDataset]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_image_size_resizes_any_dataset():
    ds = load_dataset("digits", "test", image_size=16)
    assert ds.image_shape == (1, 16, 16)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    # a resized image keeps the original's mean brightness (up to interpolation at the borders)
    small = load_dataset("digits", "test")
    assert abs(float(ds.x.mean()) - float(small.x.mean())) < 0.01


# --------------------------------------------------------------------------- ImageDataset


def _toy(n: int = 10) -> ImageDataset:
    x = torch.rand(n, 3, 4, 4)
    y = torch.arange(n) % 3
    return ImageDataset("toy", "test", x, y, ["a", "b", "c"])


def test_dataset_properties_subset_take_and_batches():
    ds = _toy(10)
    assert len(ds) == 10 and ds.num_classes == 3 and ds.image_shape == (3, 4, 4)
    assert "n=10" in repr(ds)

    sub = ds.subset(4)
    assert len(sub) == 4 and torch.equal(sub.x, ds.x[:4]) and torch.equal(sub.y, ds.y[:4])
    assert len(ds.subset(100)) == 10
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RobustlabError):
            ds.subset(bad)

    picked = ds.take([7, 2, 2])
    assert torch.equal(picked.x, ds.x[[7, 2, 2]]) and picked.y.tolist() == [1, 2, 2]
    assert len(ds.take(np.array([0, 9]))) == 2
    assert len(ds.take(ds.y == 0)) == 4  # boolean mask
    with pytest.raises(RobustlabError, match="out of range"):
        ds.take([10])
    with pytest.raises(RobustlabError, match="no examples"):
        ds.take([])

    got = list(ds.batches(4))
    assert [(b, s, len(x)) for b, s, x, _ in got] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert torch.equal(torch.cat([x for _, _, x, _ in got]), ds.x)
    assert torch.equal(torch.cat([y for _, _, _, y in got]), ds.y)
    with pytest.raises(RobustlabError, match="batch_size"):
        list(ds.batches(0))


def test_dataset_validation_rejects_bad_inputs():
    x, y, classes = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), ["a", "b"]
    ImageDataset("ok", "test", x, y.int(), classes)  # integer labels of any width are fine
    assert ImageDataset("ok", "test", x, y.int(), classes).y.dtype == torch.int64
    with pytest.raises(RobustlabError, match=r"\[0, 1\]"):
        ImageDataset("d", "test", x * 255, y, classes)
    with pytest.raises(RobustlabError, match="float32"):
        ImageDataset("d", "test", x.double(), y, classes)
    with pytest.raises(RobustlabError, match="float tensor"):
        ImageDataset("d", "test", (x * 255).to(torch.uint8), y, classes)
    with pytest.raises(RobustlabError, match="NaN"):
        ImageDataset("d", "test", torch.full_like(x, float("nan")), y, classes)
    with pytest.raises(RobustlabError, match=r"\(N, C, H, W\)"):
        ImageDataset("d", "test", x[:, 0], y, classes)
    with pytest.raises(RobustlabError, match="number of classes"):
        ImageDataset("d", "test", x, torch.tensor([0, 1, 2, 0]), classes)
    with pytest.raises(RobustlabError, match="shape"):
        ImageDataset("d", "test", x, y[:3], classes)
    with pytest.raises(RobustlabError, match="integer"):
        ImageDataset("d", "test", x, y.float(), classes)
    with pytest.raises(RobustlabError, match="classes is empty"):
        ImageDataset("d", "test", x, y, [])
    with pytest.raises(RobustlabError, match="unique"):
        ImageDataset("d", "test", x, y, ["a", "a"])
    with pytest.raises(RobustlabError, match="no images"):
        ImageDataset("d", "test", x[:0], y[:0], classes)


# --------------------------------------------------------------------------- npz


def test_npz_grayscale_without_and_with_channel_axis(tmp_path):
    x3 = _rng_images(6, 5, 7, None, seed=1)
    y = np.array([0, 1, 2, 3, 4, 9], dtype=np.int64)
    np.savez(tmp_path / "mnist_test.npz", x=x3, y=y)
    np.savez(tmp_path / "mnist_train.npz", x=x3[..., None], y=y, extra=np.zeros(3))
    test = load_dataset("mnist", "test", root=tmp_path)
    train = load_dataset("mnist", "train", root=str(tmp_path))
    for ds in (test, train):
        assert ds.image_shape == (1, 5, 7) and ds.x.dtype == torch.float32
        assert torch.equal(ds.x, _as_nchw_float(x3))
        assert ds.y.tolist() == y.tolist() and ds.y.dtype == torch.int64
        assert ds.classes == [str(i) for i in range(10)]  # default names
    assert (test.name, test.split, train.split) == ("mnist", "test", "train")


def test_npz_rgb_with_class_names(tmp_path):
    x = _rng_images(5, 8, 8, 3, seed=2)
    y = np.array([0, 1, 1, 0, 1])
    np.savez(tmp_path / "cifar10_test.npz", x=x, y=y, classes=np.array(["cat", "dog"]))
    ds = load_dataset("CIFAR10", root=tmp_path)
    assert ds.image_shape == (3, 8, 8) and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert torch.equal(ds.x, _as_nchw_float(x))
    assert float(ds.x.max()) <= 1.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((3, 4, 4), np.float32), "y": np.zeros(3, np.int64)}, "must be uint8"),
        ({"x": np.zeros((3, 3, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "channels-first"),
        ({"x": np.zeros((3, 4), np.uint8), "y": np.zeros(3, np.int64)}, r"shape \(N, H, W\)"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, 1, 10])}, "label 10 is outside the 10 classes"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, -1, 1])}, "label -1 is outside"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(4, np.int64)}, "3 images but 4 labels"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(3, np.float32)}, "labels must be integers"),
        ({"x": np.zeros((3, 4, 4), np.uint8)}, "missing array"),
        (
            {"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(3, np.int64), "classes": np.array(["a", 1], object)},
            "without unpickling",
        ),
    ],
)
def test_npz_bad_files_are_rejected_clearly(tmp_path, arrays, message):
    path = tmp_path / "mnist_test.npz"
    np.savez(path, **arrays)
    with pytest.raises(RobustlabError, match=message) as info:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_npz_labels_checked_against_class_names_in_file(tmp_path):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "svhn_test.npz", x=x, y=np.array([0, 2]), classes=np.array(["a", "b"]))
    with pytest.raises(RobustlabError, match="label 2 is outside the 2 classes"):
        load_dataset("svhn", root=tmp_path)


def test_corrupt_npz_is_reported(tmp_path):
    (tmp_path / "mnist_test.npz").write_bytes(b"not a zip file")
    with pytest.raises(RobustlabError, match="not a readable .npz"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------- torchvision layouts


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_layout(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = _rng_images(7, 28, 28, None, seed=3)
    y = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", x, compress)
    _write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", y, compress)
    ds = load_dataset("mnist", "test", root=tmp_path)
    assert ds.image_shape == (1, 28, 28) and len(ds) == 7
    assert torch.equal(ds.x, _as_nchw_float(x))
    assert ds.y.tolist() == y.tolist() and ds.y.dtype == torch.int64
    with pytest.raises(RobustlabError, match="not found"):
        load_dataset("mnist", "train", root=tmp_path)  # only the test files exist


def test_fashion_mnist_idx_layout_and_class_names(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", _rng_images(3, 28, 28, None), True)
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 9, 8], np.uint8), False)
    ds = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert [ds.classes[i] for i in ds.y.tolist()] == ["T-shirt/top", "Ankle boot", "Bag"]


def test_idx_damaged_or_incomplete_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = _rng_images(4, 28, 28, None)
    _write_idx(raw / "t10k-images-idx3-ubyte", x, False)
    with pytest.raises(RobustlabError, match="not its partner.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8), False)
    data = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(RobustlabError, match="truncated"):
        load_dataset("mnist", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(RobustlabError, match="not an IDX file"):
        load_dataset("mnist", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bbroken gzip")
    with pytest.raises(RobustlabError, match="cannot read IDX"):
        load_dataset("mnist", root=tmp_path)


def _cifar_batch(n: int, seed: int, label_key: str, bytes_keys: bool, num_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        "batch_label": "batch",
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        "filenames": [f"img{i}.png" for i in range(n)],
    }
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


def _expected_cifar_x(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def test_cifar10_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for i in range(1, 6):  # protocol 2 with bytes keys, like the official Python 2 files
        batch = _cifar_batch(3, seed=i, label_key="labels", bytes_keys=True)
        batches.append(batch)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test_batch = _cifar_batch(4, seed=9, label_key="labels", bytes_keys=False)
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=5))
    names = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))

    train = load_dataset("cifar10", "train", root=tmp_path)
    assert len(train) == 15 and train.image_shape == (3, 32, 32) and train.classes == names
    assert torch.equal(train.x, _expected_cifar_x(np.concatenate([b[b"data"] for b in batches])))
    assert train.y.tolist() == sum((b[b"labels"] for b in batches), [])
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(test.x, _expected_cifar_x(test_batch["data"]))
    assert test.y.tolist() == test_batch["labels"]

    (folder / "data_batch_3").unlink()
    with pytest.raises(RobustlabError, match="incomplete.*data_batch_3"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_cifar100_pickle_layout_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = _cifar_batch(5, seed=4, label_key="fine_labels", bytes_keys=True, num_classes=100)
    batch[b"coarse_labels"] = [0] * 5
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=4))
    ds = load_dataset("cifar100", "test", root=tmp_path)  # no meta file: default names
    assert ds.num_classes == 100 and ds.classes[0] == "apple" and ds.classes[-1] == "worm"
    assert ds.y.tolist() == batch[b"fine_labels"]
    assert torch.equal(ds.x, _expected_cifar_x(batch[b"data"]))


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(f"echo pwned > {marker}")]}
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(RobustlabError, match=r"refusing to unpickle (posix|nt|os)\.system") as info:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(folder / "test_batch") in str(info.value)
    assert not marker.exists()

    for payload in (
        pickle.dumps(eval),  # builtins.eval
        pickle.dumps({"f": pickle.loads}),
        b"cbuiltins\nexec\n(S'open(\"x\",\"w\")'\ntR.",
        b"csubprocess\nPopen\n(S'true'\ntR.",
    ):
        path = tmp_path / "payload.pkl"
        path.write_bytes(payload)
        with pytest.raises(RobustlabError, match="refusing"):
            load_restricted_pickle(path)
    # plain data still loads
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": np.arange(3), "b": [np.int64(2), b"x", "s"]}))
    ok = load_restricted_pickle(tmp_path / "ok.pkl")
    assert ok["a"].tolist() == [0, 1, 2] and ok["b"][0] == 2
    # files written by numpy 1.x name numpy.core; they load without a deprecation warning
    old_style = pickle.dumps({b"data": np.arange(4, dtype=np.uint8)}, protocol=2)
    (tmp_path / "old.pkl").write_bytes(old_style.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_restricted_pickle(tmp_path / "old.pkl")[b"data"].tolist() == [0, 1, 2, 3]
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(RobustlabError, match="not a readable pickle"):
        load_restricted_pickle(tmp_path / "junk.pkl")


@pytest.mark.parametrize("subfolder", ["", "svhn"])
def test_svhn_mat_layout(tmp_path, subfolder):
    from scipy.io import savemat

    x_nhwc = _rng_images(6, 32, 32, 3, seed=5)
    digits = np.array([1, 10, 3, 10, 9, 2])  # 10 means digit 0
    folder = tmp_path / subfolder
    folder.mkdir(exist_ok=True)
    mat = {"X": x_nhwc.transpose(1, 2, 3, 0), "y": digits.reshape(-1, 1).astype(np.uint8)}
    savemat(folder / "extra_32x32.mat", mat)
    ds = load_dataset("svhn", "extra", root=tmp_path)
    assert ds.image_shape == (3, 32, 32) and len(ds) == 6
    assert ds.y.tolist() == [1, 0, 3, 0, 9, 2]
    assert torch.equal(ds.x, _as_nchw_float(x_nhwc))


def test_damaged_svhn_mat_is_reported(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage" * 30)
    with pytest.raises(RobustlabError, match="test_32x32.mat"):
        load_dataset("svhn", root=tmp_path)


# --------------------------------------------------------------------------- missing data and the data root


def test_missing_dataset_names_every_path_tried(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(RobustlabError) as info:
        load_dataset("mnist", "test", root=root)
    message = str(info.value)
    assert "'mnist'" in message and "never downloads" in message
    for name in (
        "mnist_test.npz",
        "MNIST/raw/t10k-images-idx3-ubyte",
        "MNIST/raw/t10k-images-idx3-ubyte.gz",
        "MNIST/raw/t10k-labels-idx1-ubyte",
        "MNIST/raw/t10k-labels-idx1-ubyte.gz",
    ):
        assert str(root / name) in message
    assert "does not exist" in message and "ROBUSTLAB_DATA" in message

    with pytest.raises(RobustlabError) as info:
        load_dataset("cifar10", "train", root=tmp_path)
    message = str(info.value)
    for name in ["cifar10_train.npz"] + [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]:
        assert str(tmp_path / name) in message
    with pytest.raises(RobustlabError) as info:
        load_dataset("svhn", "train", root=tmp_path)
    assert str(tmp_path / "train_32x32.mat") in str(info.value)
    assert str(tmp_path / "svhn" / "train_32x32.mat") in str(info.value)


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == tmp_path.resolve() / "data"
    assert default_data_root(tmp_path / "x") == (tmp_path / "x").resolve()
    env_root = tmp_path / "env"
    env_root.mkdir()
    monkeypatch.setenv("ROBUSTLAB_DATA", str(env_root))
    assert default_data_root() == env_root.resolve()
    np.savez(env_root / "mnist_test.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.array([0, 1]))
    assert len(load_dataset("mnist")) == 2  # found through the environment variable
    with pytest.raises(RobustlabError, match=r"ROBUSTLAB_DATA"):
        load_dataset("mnist", "train")


# --------------------------------------------------------------------------- image folder


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_grayscale_with_split_folders(tmp_path):
    a = np.full((6, 5), 10, np.uint8)
    b = np.full((6, 5), 200, np.uint8)
    _png(tmp_path / "train" / "zebra" / "1.png", a)
    _png(tmp_path / "train" / "ant" / "2.png", b)
    _png(tmp_path / "train" / "ant" / "1.png", a)
    _png(tmp_path / "test" / "ant" / "1.png", b)
    ds = load_dataset("imagefolder", "train", root=tmp_path)
    assert ds.classes == ["ant", "zebra"]  # sorted by folder name
    assert ds.image_shape == (1, 6, 5)
    assert ds.y.tolist() == [0, 0, 1]  # ant/1.png, ant/2.png, zebra/1.png
    assert torch.allclose(ds.x.flatten(1).mean(1), torch.tensor([10, 200, 10]) / 255.0)
    with pytest.raises(RobustlabError, match=r"no split 'val'.*train, test"):
        load_dataset("imagefolder", "val", root=tmp_path)


def test_imagefolder_without_split_mixed_modes_become_rgb(tmp_path):
    _png(tmp_path / "cat" / "a.png", np.full((4, 4), 50, np.uint8))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    _png(tmp_path / "dog" / "b.png", rgb)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", "test", root=tmp_path)
    assert ds.image_shape == (3, 4, 4) and ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 1]
    assert torch.allclose(ds.x[0], torch.full((3, 4, 4), 50 / 255))
    assert torch.equal(ds.x[1, 0], torch.ones(4, 4)) and float(ds.x[1, 1:].max()) == 0.0


def test_imagefolder_sizes_and_errors(tmp_path):
    _png(tmp_path / "a" / "1.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "b" / "1.png", np.full((16, 12, 3), 255, np.uint8))
    with pytest.raises(RobustlabError, match="different sizes.*image_size"):
        load_dataset("imagefolder", root=tmp_path)
    ds = load_dataset("imagefolder", root=tmp_path, image_size=10)
    assert ds.image_shape == (3, 10, 10)
    assert float(ds.x[0].max()) == 0.0 and float(ds.x[1].min()) == 1.0
    with pytest.raises(RobustlabError, match="needs root"):
        load_dataset("imagefolder")
    (tmp_path / "c").mkdir()
    with pytest.raises(RobustlabError, match="holds no images"):
        load_dataset("imagefolder", root=tmp_path, image_size=10)
    (tmp_path / "c" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RobustlabError, match="bad.png: cannot read"):
        load_dataset("imagefolder", root=tmp_path, image_size=10)
    with pytest.raises(RobustlabError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing")


# --------------------------------------------------------------------------- the real benchmark files


@needs_shared
def test_real_mnist_test():
    ds = load_dataset("mnist", "test", root=SHARED)
    assert len(ds) == 10000 and ds.image_shape == (1, 28, 28)
    counts = torch.bincount(ds.y, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(ds.x.mean()) * 255 - 33.79) < 0.01
    assert ds.classes == [str(i) for i in range(10)]


@needs_shared
def test_real_cifar10_test():
    ds = load_dataset("cifar10", "test", root=SHARED)
    assert len(ds) == 1017 and ds.image_shape == (3, 32, 32)
    means = (ds.x.mean(dim=(0, 2, 3)) * 255).tolist()
    assert means == pytest.approx([126.5, 124.1, 115.0], abs=0.06)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    assert len(ds.subset(1000)) == 1000


@needs_shared
def test_real_fashion_mnist_test_class_names():
    ds = load_dataset("fashion_mnist", "test", root=SHARED)
    assert len(ds) == 10000 and torch.bincount(ds.y).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_imagefolder_skips_hidden_folders(tmp_path):
    _png(tmp_path / "a" / "1.png", np.zeros((3, 3), np.uint8))
    _png(tmp_path / "a" / ".ipynb_checkpoints" / "1-checkpoint.png", np.zeros((3, 3), np.uint8))
    _png(tmp_path / ".hidden" / "1.png", np.zeros((3, 3), np.uint8))
    _png(tmp_path / "b" / "nested" / "2.PNG", np.full((3, 3), 255, np.uint8))
    ds = load_dataset("imagefolder", root=tmp_path)
    assert ds.classes == ["a", "b"] and ds.y.tolist() == [0, 1]


# --------------------------------------------------------------------------- the Dataset protocol


def _standard_layout(x: torch.Tensor) -> bool:
    """Contiguous with the strides of a fresh tensor (is_contiguous() also passes a permuted
    one-channel tensor, whose strides send convolutions to other kernels)."""
    return x.stride() == torch.empty(x.shape).stride()


def test_in_memory_batch_is_exactly_slicing():
    ds = load_dataset("digits", "test")
    assert isinstance(ds, Dataset) and ds.in_memory
    assert ds.labels is ds.y and ds.labels.dtype == torch.int64
    for a, b in ((0, 64), (64, 128), (400, 445), (10, 10)):
        x, y = ds.batch(range(a, b))
        assert torch.equal(x, ds.x[a:b]) and torch.equal(y, ds.y[a:b])
        assert x.data_ptr() == ds.x[a:b].data_ptr() and x.stride() == ds.x[a:b].stride()  # views, no copy
        assert _standard_layout(x) and x.dtype == torch.float32
        xs, ys = ds.batch(slice(a, b))
        assert torch.equal(xs, x) and torch.equal(ys, y)
    idx = [5, 0, 5, 444]
    for form in (idx, np.array(idx), torch.tensor(idx), range(0, 8, 2)):
        x, y = ds.batch(form)
        expected = torch.as_tensor(list(form))
        assert torch.equal(x, ds.x[expected]) and torch.equal(y, ds.y[expected]) and _standard_layout(x)
    for bad in (range(440, 446), [445], [-1], torch.tensor([[1]]), [0.5]):
        with pytest.raises(RobustlabError, match="out of range|one-dimensional|integer"):
            ds.batch(bad)


def _gray_rgb_folder(root: Path, n_per_class: int = 4) -> dict[str, np.ndarray]:
    """Class folders a (grey PNGs) and b (RGB PNGs, one JPEG), 6x5 pixels; returns the pixels by file name."""
    rng = np.random.default_rng(7)
    written = {}
    for k in range(n_per_class):
        grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
        rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        _png(root / "a" / f"{k}.png", grey)
        _png(root / "b" / f"{k}.png", rgb)
        written[f"a/{k}.png"], written[f"b/{k}.png"] = np.repeat(grey[:, :, None], 3, axis=2), rgb
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)).save(root / "b" / "z.JPG", quality=90)
    return written


def test_streaming_folder_equals_in_memory_folder(tmp_path):
    written = _gray_rgb_folder(tmp_path)
    lazy = load_dataset("imagefolder", root=tmp_path, stream=True)
    eager = load_dataset("imagefolder", root=tmp_path, stream=False)
    assert isinstance(lazy, ImageFolderDataset) and not hasattr(lazy, "x") and not lazy.in_memory
    assert isinstance(eager, ImageDataset) and isinstance(load_dataset("imagefolder", root=tmp_path), ImageDataset)
    assert len(lazy) == len(eager) == 9 and lazy.classes == eager.classes == ["a", "b"]
    assert lazy.image_shape == eager.image_shape == (3, 6, 5) and lazy.num_classes == 2
    assert torch.equal(lazy.labels, eager.y) and lazy.labels.tolist() == [0] * 4 + [1] * 5
    for positions in (range(0, 9), range(2, 5), [8, 0, 0, 4], torch.tensor([3])):
        x, y = lazy.batch(positions)
        xe, ye = eager.batch(positions)
        assert torch.equal(x, xe) and torch.equal(y, ye)
        assert x.dtype == torch.float32 and _standard_layout(x) and y.dtype == torch.int64
    x, _ = lazy.batch(range(0, 8))  # the PNGs are lossless: exactly the pixels written
    for i, path in enumerate(lazy.files[:8]):
        expected = torch.from_numpy(written[f"{path.parent.name}/{path.name}"]).permute(2, 0, 1).float() / 255
        assert torch.equal(x[i], expected)
    assert torch.equal(lazy.materialize().x, eager.x)
    assert [len(b[2]) for b in lazy.batches(4)] == [4, 4, 1]
    for empty in (range(3, 3), [], torch.zeros(0, dtype=torch.long)):
        x, y = lazy.batch(empty)
        assert x.shape == (0, 3, 6, 5) and x.dtype == torch.float32 and y.shape == (0,)


def test_streaming_folder_decodes_only_the_requested_files(tmp_path, monkeypatch):
    import robustlab.data.image_folder as image_folder

    _gray_rgb_folder(tmp_path)
    decoded: list[str] = []
    real = image_folder.decode_image

    def counting(path, *args, **kwargs):
        decoded.append(f"{Path(path).parent.name}/{Path(path).name}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(image_folder, "decode_image", counting)
    lazy = load_dataset("imagefolder", root=tmp_path, stream=True)
    assert decoded == []  # loading reads headers only
    lazy.batch([6, 1])
    assert decoded == ["b/2.png", "a/1.png"]
    decoded.clear()
    lazy.batch(range(3, 5))
    assert decoded == ["a/3.png", "b/0.png"]
    decoded.clear()
    sub, picked = lazy.subset(3), lazy.take([8, 2])
    assert decoded == []  # subset and take select files, decoding nothing
    assert len(sub) == 3 and sub.labels.tolist() == [0, 0, 0] and sub.files == lazy.files[:3]
    assert picked.labels.tolist() == [1, 0] and torch.equal(picked.batch(range(0, 2))[0], lazy.batch([8, 2])[0])
    assert len(lazy.take(lazy.labels == 1)) == 5 and len(lazy.subset(100)) == 9
    decoded.clear()
    resized = lazy.with_transform(resize_center_crop(4)).take([0, 5])
    assert resized.image_shape == (3, 4, 4) and decoded == []  # the shape comes without decoding
    assert resized.batch(range(0, 2))[0].shape == (2, 3, 4, 4) and decoded == ["a/0.png", "b/1.png"]
    with pytest.raises(RobustlabError, match="out of range"):
        lazy.take([9])
    with pytest.raises(RobustlabError, match="no examples"):
        lazy.take([])


def test_size_decides_in_memory_or_streaming(tmp_path, monkeypatch):
    import robustlab.data.catalog as catalog

    _gray_rgb_folder(tmp_path)  # 9 RGB images of 6x5: 3,240 bytes as float32
    assert isinstance(load_dataset("imagefolder", root=tmp_path), ImageDataset)
    monkeypatch.setattr(catalog, "EAGER_LIMIT_BYTES", 3239)
    assert isinstance(load_dataset("imagefolder", root=tmp_path), ImageFolderDataset)
    assert isinstance(load_dataset("imagefolder", root=tmp_path, stream=False), ImageDataset)
    # arrays already in memory stay so; a resize of them streams when large, else is applied now
    assert isinstance(load_dataset("digits", image_size=4, stream=True), TransformedDataset)
    monkeypatch.setattr(catalog, "EAGER_LIMIT_BYTES", 10**9)
    assert isinstance(load_dataset("digits", image_size=4), ImageDataset)
    with pytest.raises(RobustlabError, match="stream"):
        load_dataset("digits", stream="yes")


def test_imagenet_layout_streams_with_resize_and_crop(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for wnid, sizes in (("n01440764", [(40, 30), (30, 50)]), ("n01443537", [(36, 36)])):
        for k, (w, h) in enumerate(sizes):
            folder = tmp_path / "val" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
                folder / f"ILSVRC2012_val_{wnid}_{k}.JPEG", quality=95
            )
    (tmp_path / "meta.bin").write_bytes(b"never unpickled")
    with pytest.raises(RobustlabError, match="different sizes.*image_size"):
        load_dataset("imagefolder", "val", root=tmp_path, stream=True)
    crop = resize_center_crop(16, crop_pct=0.8)  # shorter side to 20, then the centre 16x16
    ds = load_dataset("imagefolder", "val", root=tmp_path, transform=crop, stream=True)
    assert isinstance(ds, TransformedDataset) and ds.classes == ["n01440764", "n01443537"]
    assert ds.image_shape == (3, 16, 16) and ds.labels.tolist() == [0, 0, 1]
    x, y = ds.batch(range(0, 3))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # image by image: what the transform gives on each image decoded alone
    for i in range(3):
        alone = ds.source.read_images([i])[0]
        assert torch.equal(x[i : i + 1], crop(alone))
    assert torch.equal(ds.materialize().x, x) and torch.equal(ds.subset(2).batch([1])[0], x[1:2])


def test_transforms_resize_shorter_side_and_crop_the_centre():
    # a horizontal ramp 8 high, 12 wide: the centre crop keeps the middle columns
    ramp = torch.linspace(0, 1, 12).expand(1, 3, 8, 12).contiguous()
    assert ResizeShorter(4).output_shape((3, 8, 12)) == (3, 4, 6)
    assert ResizeShorter(4)(ramp).shape == (1, 3, 4, 6)
    assert ResizeShorter(6)(ramp.transpose(2, 3)).shape == (1, 3, 9, 6)
    crop = CenterCrop((8, 4))(ramp)
    assert torch.equal(crop, ramp[:, :, :, 4:8]) and crop.is_contiguous()
    with pytest.raises(RobustlabError, match="cannot crop"):
        CenterCrop(9)(ramp)
    # timm's crop_pct: 224 / 0.875 = 256 on the shorter side, then the centre 224
    t = resize_center_crop(224, crop_pct=0.875)
    assert t.transforms[0].size == 256 and t.output_shape((3, 300, 400)) == (3, 224, 224)
    x = torch.rand(2, 3, 300, 400)
    out = t(x)
    assert out.shape == (2, 3, 224, 224) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert abs(float(out.mean()) - float(x.mean())) < 0.01
    const = torch.full((1, 1, 30, 20), 0.25)
    assert torch.allclose(t(const), torch.full((1, 1, 224, 224), 0.25))
    # from a model config: robustlab's (H, W), timm's (C, H, W) with crop_pct, an explicit resize
    from robustlab.models import model_config

    assert transform_for_model(model_config("smallcnn")).output_shape((1, 40, 28)) == (1, 28, 28)
    timm_like = transform_for_model({"input_size": (3, 224, 224), "crop_pct": 0.9})
    assert timm_like.transforms[0].size == 248
    assert transform_for_model({"input_size": 32, "resize": 36}).transforms[0].size == 36
    assert Resize(5)(torch.rand(1, 1, 8, 8)).shape == (1, 1, 5, 5)
    assert resize_center_crop(16).config() == {
        "name": "compose",
        "params": {"transforms": [{"name": "resize_shorter", "params": {"size": 16}},
                                  {"name": "center_crop", "params": {"size": [16, 16]}}]},
    }
    for bad in (dict(input_size=0), dict(input_size=16, crop_pct=1.5), dict(input_size="16")):
        with pytest.raises(RobustlabError):
            resize_center_crop(**bad)


def test_transform_seam_on_in_memory_sets_and_generators():
    ds = load_dataset("digits", "test")
    up = ds.with_transform(Resize(16))
    assert not hasattr(up, "x") and up.image_shape == (1, 16, 16) and len(up) == len(ds)
    x, y = up.batch(range(10, 20))
    assert torch.equal(x, Resize(16)(ds.x[10:20])) and torch.equal(y, ds.y[10:20])
    assert torch.equal(up.take([3, 1]).batch(range(0, 2))[0], up.batch([3, 1])[0])

    def noise(batch, generator=None):  # a corruption: random, reproducible from the generator
        return (batch + 0.1 * torch.randn(batch.shape, generator=generator)).clamp(0, 1)

    noisy = ds.with_transform(noise)
    assert noisy.image_shape == (1, 8, 8)  # found by running it once
    a = noisy.batch(range(0, 5), generator=torch.Generator().manual_seed(1))[0]
    b = noisy.batch(range(0, 5), generator=torch.Generator().manual_seed(1))[0]
    c = noisy.batch(range(0, 5), generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    chained = noisy.with_transform(Resize(4))
    assert chained.image_shape == (1, 4, 4) and chained.batch(range(0, 2))[0].shape == (2, 1, 4, 4)
    mem = up.subset(3).materialize()
    assert isinstance(mem, ImageDataset) and torch.equal(mem.x, Resize(16)(ds.x[:3]))
    with pytest.raises(RobustlabError, match=r"outside \[0, 1\]"):
        ds.with_transform(lambda b: b * 2).batch(range(0, 4))
    with pytest.raises(RobustlabError, match="must return a batch"):
        ds.with_transform(lambda b: b[0]).batch(range(0, 4))
    with pytest.raises(RobustlabError, match="float32"):
        ds.with_transform(lambda b: b.double()).batch(range(0, 4))
    with pytest.raises(RobustlabError, match="callable"):
        ds.with_transform("resize")


def test_streaming_folder_errors_name_the_file(tmp_path):
    _png(tmp_path / "a" / "1.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "a" / "2.png", _rng_images(1, 8, 8, 3)[0])
    good = (tmp_path / "a" / "2.png").read_bytes()
    (tmp_path / "a" / "2.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut off
    lazy = load_dataset("imagefolder", root=tmp_path, stream=True)  # headers are fine
    assert lazy.batch([0])[0].shape == (1, 3, 8, 8)
    with pytest.raises(RobustlabError, match=r"a/2\.png: cannot read"):
        lazy.batch(range(0, 2))
    with pytest.raises(RobustlabError, match=r"a/2\.png: cannot read"):
        load_dataset("imagefolder", root=tmp_path)  # small: decoded at load
    (tmp_path / "a" / "2.png").write_bytes(b"\x89PNG nonsense")
    with pytest.raises(RobustlabError, match=r"a/2\.png: cannot read"):
        load_dataset("imagefolder", root=tmp_path, stream=True)  # not an image at all: at load
    (tmp_path / "a" / "2.png").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(RobustlabError, match="holds no images"):
        load_dataset("imagefolder", root=tmp_path, stream=True)
    (tmp_path / "b").rmdir()
    (tmp_path / "a" / "1.png").unlink()
    with pytest.raises(RobustlabError, match="holds no images"):
        load_dataset("imagefolder", root=tmp_path, stream=True)
    with pytest.raises(RobustlabError, match="no class folders"):
        load_dataset("imagefolder", root=tmp_path / "a", stream=True)


def test_training_on_a_streaming_folder_equals_training_in_memory(tmp_path):
    from robustlab.models import create_model
    from robustlab.training import TrainConfig, train

    digits = load_dataset("digits", "test").subset(60)
    for i in range(60):
        pixels = (digits.x[i, 0] * 255).round().to(torch.uint8).numpy()
        _png(tmp_path / f"class{int(digits.y[i])}" / f"{i:03d}.png", pixels)
    lazy = load_dataset("imagefolder", root=tmp_path, stream=True)
    assert lazy.image_shape == (1, 8, 8) and _standard_layout(lazy.batch([3, 1])[0])
    weights = []
    for data in (lazy, lazy.materialize()):
        torch.manual_seed(0)
        model = create_model("digits_cnn", num_classes=lazy.num_classes)
        train(model, data, TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0, val_n=10), progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
