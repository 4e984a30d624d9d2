"""A model that cannot take the images (channels, size) ends in one line that says what it is built
for and what the images are: the same probe (robustlab.models.probe) for perturb, eval and train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustlab.cli import main

GOLDEN = Path(__file__).parent / "golden"
GREY_8 = str(GOLDEN / "digits_cnn.safetensors")


def _folder(path: Path, shape: tuple[int, ...], n: int = 2) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random(shape) * 255).astype("uint8")).save(path / f"{i}.png")
    return path


def _perturb(model: str, images: Path, out: Path) -> list[str]:
    return ["perturb", "--model", model, "--norm", "linf", "--eps", "8/255", "--attack", "fgsm",
            "--images", str(images), "--out", str(out), "--device", "cpu"]


def _one_error(capsys) -> str:
    """Exactly one error line (a warning line about random weights may come before it), no traceback."""
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("robustlab: error:")]
    assert len(err) == 1 and "Traceback" not in text and "internal error" not in text, text
    return err[0]


def test_rgb_images_and_a_grey_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_perturb(GREY_8, _folder(tmp_path / "rgb", (8, 8, 3)), out)) == 2
    line = _one_error(capsys)
    assert "is built for 1-channel (grey) 8x8 images" in line and "has 3x8x8 images" in line
    assert not out.exists()  # nothing written


def test_grey_images_and_an_rgb_model(tmp_path, capsys):
    with pytest.warns(UserWarning):  # a registry architecture without weights: random weights, said so
        code = main(_perturb("cifar_cnn", _folder(tmp_path / "grey", (32, 32)), tmp_path / "out"))
    assert code == 2
    line = _one_error(capsys)
    assert "built for 3-channel (RGB) images" in line and "has 1x32x32 images" in line


def test_images_of_another_size(tmp_path, capsys):
    """lenet flattens a 28x28 feature map into its first linear layer: 8x8 images cannot pass."""
    with pytest.warns(UserWarning):
        code = main(_perturb("lenet", _folder(tmp_path / "small", (8, 8)), tmp_path / "out"))
    assert code == 2
    line = _one_error(capsys)
    assert "built for 1-channel (grey) images" in line and "has 1x8x8 images" in line


def test_eval_says_the_same_and_leaves_no_store(tmp_path, capsys):
    """The runner's probe: one line, and the store file is never created (item 10)."""
    db = tmp_path / "r.db"
    code = main(["eval", "--model", "cifar_cnn", "--data", "digits", "--norm", "linf", "--eps", "0.1",
                 "--attack", "fgsm", "--db", str(db), "--device", "cpu", "--n", "8"])
    assert code == 2
    line = _one_error(capsys)
    assert "the model cifar_cnn is built for 3-channel (RGB) images; digits:test has 1x8x8 images" in line
    assert not db.exists() and not list(tmp_path.iterdir())
