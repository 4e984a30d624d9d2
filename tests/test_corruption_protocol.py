"""The corruption protocol: tasks, on-the-fly corruption from the batch generator, rows, mCE against a
baseline, resume after a kill, precorrupted data, and the metrics' formulas."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from robustlab.corruptions import CORRUPTIONS, Corruption, register_corruption
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import (
    ALEXNET_IMAGENET_C,
    ALEXNET_IMAGENET_C_MEAN,
    CorruptionError,
)
from robustlab.eval.protocols import PROTOCOLS, CorruptionProtocol
from robustlab.eval.protocols.corruption import corruption_tasks
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore


class Crash(Exception):
    pass


if "test_noise" not in CORRUPTIONS:

    @register_corruption
    class NoiseForTests(Corruption):
        """Gaussian noise of sd 0.1 * severity (a simple corruption registered by the tests)."""

        name = "test_noise"
        suite_name = "test"
        randomized = True
        tables: ClassVar[dict[int, tuple]] = {4: (0.1, 0.2, 0.3, 0.4, 0.5)}

        def apply(self, x, generator):
            sd = self.table_entry(min(x.shape[-2:]))
            return x + sd * torch.randn(x.shape, generator=generator, device=x.device)


def _rows(store, run_id, task):
    return [tuple(r)[2:] for r in store.sample_rows("corruption_samples", run_id, task)]


def test_metric_formulas_of_hendrycks_and_dietterich():
    m = CorruptionError()
    m.update("clean", 0, [True] * 8 + [False] * 2)  # clean error 0.2
    m.update("a", 1, [True] * 6 + [False] * 4)  # 0.4
    m.update("a", 2, [True] * 4 + [False] * 6)  # 0.6
    m.update("b", 1, [True] * 5 + [False] * 5)  # 0.5
    base = {"clean": {0: 0.1}, "a": {1: 0.5, 2: 0.7}, "b": {1: 0.25}}
    r = m.compute(base)
    assert r["ce"]["a"] == pytest.approx((0.4 + 0.6) / (0.5 + 0.7))
    assert r["ce"]["b"] == pytest.approx(2.0)
    assert r["mce"] == pytest.approx(((1.0 / 1.2) + 2.0) / 2)
    assert r["relative_ce"]["a"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6))
    assert r["relative_ce"]["b"] == pytest.approx(0.3 / 0.15)
    assert r["mean_corruption_error"] == pytest.approx((0.5 + 0.5) / 2)
    # AlexNet against itself: every CE is 1, so mCE and relative mCE are 100%
    alex = CorruptionError()
    for c, per in ALEXNET_IMAGENET_C.items():
        for s, e in per.items():
            alex.counts[(c, s)] = [1_000_000, round(e * 1_000_000)]  # as update() would count them
    out = alex.compute(ALEXNET_IMAGENET_C)
    assert len(ALEXNET_IMAGENET_C_MEAN) == 15
    assert out["mce"] == pytest.approx(1.0, abs=1e-5) and out["relative_mce"] == pytest.approx(1.0, abs=1e-4)


def test_bad_input_is_one_line():
    with pytest.raises(RobustlabError, match="unknown corruption 'nope'"):
        corruption_tasks(["nope"])
    with pytest.raises(RobustlabError, match="severity must be 1, 2, 3, 4 or 5, got 7"):
        corruption_tasks(["test_noise"], (1, 7))
    with pytest.raises(RobustlabError, match="has severities 1 only, not 3"):
        corruption_tasks(["mnist_fog"], (3,))
    assert corruption_tasks(["mnist_fog", "test_noise"], None)[:2] == [("mnist_fog", 1), ("test_noise", 1)]
    with pytest.raises(RobustlabError, match="28 px; these images are 8 px"):
        CorruptionProtocol(["mnist_rotate"]).check_images((1, 8, 8))


def test_run_rows_summary_and_group(digits_model, digits_test, tmp_path):
    data = digits_test.subset(96)
    protocol = CorruptionProtocol(["test_noise"], (1, 3, 5), baseline=("toy", {"clean": {0: 0.1},
                                                                               "test_noise": {1: 0.2, 3: 0.4, 5: 0.6}}))
    with ResultsStore(tmp_path / "r.db") as store:
        res = run(digits_model, data, protocol, store, seed=1, batch_size=32)
        tasks = [t["task"] for t in store.tasks(res.run_id)]
        assert tasks == ["clean", "test_noise:1", "test_noise:3", "test_noise:5"]
        clean = _rows(store, res.run_id, "clean")
        assert len(clean) == 96
        with torch.no_grad():
            pred = torch.cat([digits_model(data.x[i: i + 32]).argmax(1) for i in range(0, 96, 32)])
        assert [r[2] for r in clean] == pred.tolist() and [r[1] for r in clean] == data.y.tolist()
        # severity 3's rows are the model's predictions on the batches corrupted with the task's generators
        from robustlab.corruptions import create_corruption
        from robustlab.eval.protocols.base import BatchContext, Task

        c = create_corruption("test_noise", 3)
        expect = []
        for b in range(3):
            ctx = BatchContext(seed=1, task=Task("test_noise:3", "corruption", 96), batch_index=b, start=32 * b,
                               device=torch.device("cpu"))
            with torch.no_grad():
                expect += digits_model(c(data.x[32 * b: 32 * b + 32], generator=ctx.generator())).argmax(1).tolist()
        got = [r[2] for r in _rows(store, res.run_id, "test_noise:3")]
        assert got == expect and got != [r[2] for r in clean]
        s = res.summary
        err = {int(k): v for k, v in s["errors"]["test_noise"].items()}
        assert err[1] <= err[5]  # more noise, more error
        assert s["clean_error"] == pytest.approx(1 - (pred == data.y).double().mean().item())
        assert s["mce"] == pytest.approx(sum(err.values()) / 1.2)
        assert s["relative_mce"] == pytest.approx(sum(e - s["clean_error"] for e in err.values()) / (0.9))
        key, title = PROTOCOLS["corruption"].leaderboard_group(store.get_run(res.run_id))
        assert "mCE vs toy" in title and key[0] == "digits"


def test_killed_and_resumed_run_gives_identical_rows(digits_model, digits_test, tmp_path, monkeypatch):
    data = digits_test.subset(100)
    protocol = lambda: CorruptionProtocol(["test_noise"], (2, 4))
    with ResultsStore(tmp_path / "full.db") as store:
        full = run(digits_model, data, protocol(), store, seed=5, batch_size=16)
        full_rows = {t["task"]: _rows(store, full.run_id, t["task"]) for t in store.tasks(full.run_id)}

    calls = {"n": 0}
    original = CorruptionProtocol.run_batch

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # the middle of the second corrupted task
            raise Crash("killed")
        return original(self, *args, **kwargs)

    with ResultsStore(tmp_path / "resumed.db") as store:
        monkeypatch.setattr(CorruptionProtocol, "run_batch", crashing)
        with pytest.raises(Crash):
            run(digits_model, data, protocol(), store, seed=5, batch_size=16)
        run_id = store.list_runs()[0]["run_id"]
        assert store.get_run(run_id)["status"] == "interrupted"
        monkeypatch.undo()
        resumed = run(digits_model, data, protocol(), store, seed=5, batch_size=16, resume=True)
        assert resumed.resumed and resumed.run_id == run_id
        rows = {t["task"]: _rows(store, run_id, t["task"]) for t in store.tasks(run_id)}
    assert rows == full_rows
    assert resumed.summary["errors"] == full.summary["errors"]


def test_precorrupted_slices_run_like_generated_ones(digits_model, digits_test, tmp_path):
    """Images corrupted once and read back from a stored set give the same rows as corrupting on the fly
    with the same generators."""
    from robustlab.data.corrupted import CorruptedDataset

    data = digits_test.subset(64)
    with ResultsStore(tmp_path / "a.db") as store:
        gen = run(digits_model, data, CorruptionProtocol(["test_noise"], (5,)), store, seed=2, batch_size=64)
        gen_rows = _rows(store, gen.run_id, "test_noise:5")
    from robustlab.corruptions import create_corruption
    from robustlab.eval.protocols.base import BatchContext, Task

    ctx = BatchContext(seed=2, task=Task("test_noise:5", "corruption", 64), batch_index=0, start=0,
                       device=torch.device("cpu"))
    xc = create_corruption("test_noise", 5)(data.x, generator=ctx.generator())
    stored = CorruptedDataset.from_arrays("toy_c", {("test_noise", 5): xc}, data.y, data.classes)
    with ResultsStore(tmp_path / "b.db") as store:
        res = run(digits_model, data, CorruptionProtocol.precorrupted(stored, with_clean=True), store, batch_size=64)
        assert _rows(store, res.run_id, "test_noise:5") == gen_rows
        assert res.summary["clean_error"] == gen.summary["clean_error"]


def test_released_layouts_load_as_data_sets(tmp_path):
    """ImageNet-C folders (corruption/severity/class/image), MNIST-C folders and CIFAR-10-C files,
    written small here, load as (corruption, severity) slices and as plain data sets."""
    import numpy as np
    from PIL import Image

    from robustlab.data import load_dataset
    from robustlab.data.corrupted import load_corrupted

    rng = np.random.default_rng(0)
    inet = tmp_path / "ImageNet-C"
    for c in ("fog", "snow"):
        for s in (1, 2):
            for k, wnid in enumerate(("n01440764", "n01443537")):
                (inet / c / str(s) / wnid).mkdir(parents=True)
                for i in range(2):
                    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                        inet / c / str(s) / wnid / f"img{i}.png")
    stored = load_corrupted("imagenet_c", tmp_path)
    assert stored.keys == [("fog", 1), ("fog", 2), ("snow", 1), ("snow", 2)]
    fog2 = load_dataset("imagenet-c", "fog:2", root=tmp_path)
    assert len(fog2) == 4 and fog2.classes == ["n01440764", "n01443537"] and fog2.labels.tolist() == [0, 0, 1, 1]
    first = np.array(Image.open(inet / "fog" / "2" / "n01440764" / "img0.png"))
    assert torch.equal(fog2.batch(range(1))[0][0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    with pytest.raises(RobustlabError, match="give the severity as split fog:S"):
        load_dataset("imagenet_c", "fog", root=tmp_path)

    mc = tmp_path / "mnist_c" / "fog"
    mc.mkdir(parents=True)
    np.save(mc / "test_images.npy", rng.integers(0, 255, (6, 28, 28, 1), dtype=np.uint8))
    np.save(mc / "test_labels.npy", np.arange(6) % 10)
    m = load_dataset("mnist_c", "fog", root=tmp_path)
    assert len(m) == 6 and m.image_shape == (1, 28, 28) and m.labels.tolist() == list(range(6))

    c10 = tmp_path / "CIFAR-10-C"
    c10.mkdir()
    images = rng.integers(0, 255, (15, 32, 32, 3), dtype=np.uint8)
    np.save(c10 / "gaussian_noise.npy", images)
    np.save(c10 / "labels.npy", np.tile(np.array([3, 1, 4]), 5))
    s4 = load_dataset("cifar10_c", "gaussian_noise:4", root=tmp_path)
    assert len(s4) == 3 and s4.labels.tolist() == [3, 1, 4] and s4.classes[3] == "cat"
    assert torch.equal(s4.batch(range(3))[0], torch.from_numpy(images[9:12]).permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(RobustlabError, match="no 'fog' at severity 1"):
        load_corrupted("cifar10_c", tmp_path).slice("fog", 1)
