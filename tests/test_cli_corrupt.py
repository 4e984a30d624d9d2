"""``robustlab corrupt``: the released file layout, a killed write that resumes to the same bytes,
evaluation into the store with a run as baseline, stored sets read back, and one-line errors."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch

from robustlab.cli import main
from robustlab.corruptions import CORRUPTIONS
from robustlab.data import load_dataset

MODEL = '''
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with mnist_test.npz: 40 digits upsampled to 28 px (no shared data needed)."""
    folder = tmp_path_factory.mktemp("data")
    d = load_dataset("digits", "test").subset(40)
    x = torch.nn.functional.interpolate(d.x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    np.savez(folder / "mnist_test.npz", x=(x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y=d.y.numpy(),
             classes=np.array([str(i) for i in range(10)]))
    (folder / "model.py").write_text(MODEL)
    return folder


def _write(root, out, *extra):
    return main(["corrupt", "--data", "mnist", "--data-root", str(root), "--n", "20", "--out", str(out),
                 "--batch-size", "8", "--no-progress", *extra])


def test_writes_the_released_layout(root, tmp_path):
    out = tmp_path / "c"
    assert _write(root, out, "--corruptions", "mnist_stripe,mnist_fog") == 0
    assert sorted(p.name for p in out.iterdir()) == ["corrupt.json", "fog.npy", "labels.npy", "stripe.npy"]
    clean = np.load(root / "mnist_test.npz")["x"][:20]
    stripe = np.load(out / "stripe.npy")
    assert stripe.dtype == np.uint8 and stripe.shape == (20, 28, 28, 1)
    assert np.array_equal(stripe[:, :, :7], 255 - clean[:, :, :7]) and np.array_equal(stripe[:, :, 7:21], clean[:, :, 7:21])
    assert np.array_equal(np.load(out / "labels.npy"), np.load(root / "mnist_test.npz")["y"][:20])
    assert json.loads((out / "corrupt.json").read_text())["corruptions"] == ["mnist_stripe", "mnist_fog"]


def test_five_severities_are_stacked_severity_major(root, tmp_path, monkeypatch):
    from robustlab.corruptions import Corruption, register_corruption

    if "cli_test_dim" not in CORRUPTIONS:
        @register_corruption
        class Dim(Corruption):
            name, suite_name = "cli_test_dim", "test"
            tables: ClassVar[dict[int, tuple]] = {8: (0.9, 0.8, 0.7, 0.6, 0.5)}

            def apply(self, x, generator):
                return x * self.table_entry(min(x.shape[-2:]))

    out = tmp_path / "d"
    assert _write(root, out, "--corruptions", "cli_test_dim") == 0
    a = np.load(out / "cli_test_dim.npy")
    clean = np.load(root / "mnist_test.npz")["x"][:20].astype(float)
    assert a.shape == (100, 28, 28, 1) and len(np.load(out / "labels.npy")) == 100
    for s, f in enumerate((0.9, 0.8, 0.7, 0.6, 0.5)):
        assert np.abs(a[20 * s: 20 * s + 20] - np.round(clean * f)).max() <= 1


def test_a_killed_write_resumes_to_the_same_bytes(root, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert _write(root, full, "--corruptions", "mnist_shot_noise,mnist_fog") == 0
    fog = CORRUPTIONS.get("mnist_fog")
    original = fog.apply
    calls = {"n": 0}

    def dying(self, x, generator):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, x, generator)

    out = tmp_path / "killed"
    monkeypatch.setattr(fog, "apply", dying)
    assert _write(root, out, "--corruptions", "mnist_shot_noise,mnist_fog") == 130
    monkeypatch.undo()
    names = {p.name for p in out.iterdir()}
    assert "fog.npy" not in names and ".fog.npy.partial" in names and "shot_noise.npy" in names
    assert json.loads((out / ".fog.progress").read_text())["done"] == 1
    assert _write(root, out, "--corruptions", "mnist_shot_noise,mnist_fog") == 0
    for f in ("fog.npy", "shot_noise.npy", "labels.npy"):
        assert (out / f).read_bytes() == (full / f).read_bytes()
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_evaluates_into_the_store_and_against_a_run(root, tmp_path, capsys):
    db = str(tmp_path / "r.db")
    base = ["corrupt", "--model", f"{root / 'model.py'}:build", "--data", "mnist", "--data-root", str(root),
            "--n", "24", "--corruptions", "mnist_stripe,mnist_fog,mnist_rotate", "--db", db, "--json", "--no-progress"]
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)
    assert [p["corruption"] for p in first["per_corruption"]] == ["mnist_stripe", "mnist_fog", "mnist_rotate"]
    assert first["mce"] is None and 0 <= first["mean_corruption_error"] <= 1
    assert main([*base, "--baseline", first["run_id"]]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["run_id"] != first["run_id"] and second["baseline"].startswith(f"run {first['run_id']}")
    # the same model, data and seed against itself: the same errors, so every CE is 1
    assert second["errors"] == first["errors"]
    assert second["mce"] == pytest.approx(1.0)
    # the report of a corruption run: table, plot, gallery
    assert main(["report", second["run_id"], "--db", db, "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "mnist_fog" in page and page.count("<img") == 2
    csv_rows = (tmp_path / "rep" / "samples.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4 * 24 and csv_rows[1].startswith("clean,clean,0,0,")


def test_stored_set_evaluates_like_the_written_one(root, tmp_path, capsys):
    out = tmp_path / "c"
    assert _write(root, out, "--corruptions", "mnist_stripe") == 0
    capsys.readouterr()
    (out / "corrupt.json").unlink()
    db = str(tmp_path / "s.db")
    common = ["--model", f"{root / 'model.py'}:build", "--data", "mnist", "--data-root", str(root), "--n", "20",
              "--db", db, "--json", "--no-progress"]
    assert main(["corrupt", *common, "--corruptions", "mnist_stripe"]) == 0
    generated = json.loads(capsys.readouterr().out)
    import shutil

    shutil.copytree(out, root / "CIFAR-10-C")  # the release folder under the data root
    try:
        assert main(["corrupt", *common, "--stored", "cifar10_c"]) == 0
    finally:
        shutil.rmtree(root / "CIFAR-10-C")
    stored = json.loads(capsys.readouterr().out)
    assert stored["errors"]["stripe"] == generated["errors"]["mnist_stripe"]


@pytest.mark.parametrize("args,needle", [
    (["--corruptions", "nope"], "robustlab: error: unknown corruption 'nope'"),
    (["--corruptions", "mnist_fog", "--severities", "3"], "robustlab: error: corruption 'mnist_fog' has one severity"),
    (["--model", "x"], "robustlab: error: give --out DIR (write corrupted files) or --model M"),
])
def test_bad_input_is_one_line(root, tmp_path, capsys, args, needle):
    assert _write(root, tmp_path / "o", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(needle) and "\n" not in err


def test_bad_severity_and_small_images(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _write(root, tmp_path / "o", "--severities", "0,6")
    assert exc.value.code == 2 and "severity must be 1, 2, 3, 4 or 5, got '0'" in capsys.readouterr().err
    assert main(["corrupt", "--data", "digits", "--out", str(tmp_path / "o"), "--corruptions", "mnist-c",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has parameters for images of 28 px; these images are 8 px" in err and "\n" not in err
