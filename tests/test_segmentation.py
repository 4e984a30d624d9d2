"""Segmentation: the scene data sets, the U-Net trained through the one training loop, attacks on the
per-pixel loss, the segmentation protocol (mIoU / pixel accuracy, resume) and the one-line errors when
a segmentation model meets a classifier's evaluation or the reverse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustlab.attacks import create_attack
from robustlab.checks import check_logits
from robustlab.data import load_dataset
from robustlab.data.scenes import SCENE_SETS, SceneSpec, make_scenes, render_scene
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import SegmentationScore, confusion_counts
from robustlab.eval.protocols import AdversarialProtocol, SegmentationProtocol
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore
from robustlab.losses import cross_entropy
from robustlab.models import ModelCard, create_model
from robustlab.threat import ThreatModel
from robustlab.training.loop import TrainConfig, accuracy, train
from robustlab.training.objectives import create_objective

DATA = Path("/work/shared/data")
THREAT = ThreatModel("linf", 0.1)


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def scenes_test():
    return load_dataset("scenes-digits", "test").subset(48)


@pytest.fixture(scope="module")
def seg_model():
    """A small U-Net trained on 600 digit scenes (standard training, Adam, 6 epochs; about 9 s of CPU;
    mIoU about 0.2 on the test scenes, where predicting background everywhere gives 0.07)."""
    torch.manual_seed(0)
    data = make_scenes(SCENE_SETS["scenes_digits"], "train", n=600, name="scenes_digits")
    model = create_model("seg_unet", num_classes=11, width=8, depth=2)
    train(model, data, TrainConfig(epochs=6, batch_size=16, lr=0.003, optimizer="adam", weight_decay=0.0), progress=False)
    return model.eval()


# ------------------------------------------------------------------------------------ data


def test_scenes_are_deterministic_and_each_scene_is_its_own():
    a = load_dataset("scenes-digits", "test")
    b = load_dataset("scenes-digits", "test")
    assert len(a) == 500 and a.image_shape == (1, 32, 32) and a.labels.shape == (500, 32, 32)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    first = make_scenes(SCENE_SETS["scenes_digits"], "test", n=7)  # the first 7 scenes of any larger set
    assert torch.equal(first.x, a.x[:7]) and torch.equal(first.y, a.y[:7])
    other = make_scenes(SceneSpec(**{**SCENE_SETS["scenes_digits"].__dict__, "seed": 1}), "test", n=7)
    assert not torch.equal(other.x, first.x)
    train = load_dataset("scenes-digits", "train")
    assert not torch.equal(train.x[:7], first.x)  # train scenes come from other draws and other digits
    assert float(a.x.min()) >= 0.0 and float(a.x.max()) <= 1.0


def test_classes_and_label_values():
    data = make_scenes(SCENE_SETS["scenes_digits"], "train", n=300)
    assert data.classes == ["background", *[str(i) for i in range(10)]] and data.num_classes == 11
    counts = torch.bincount(data.y.flatten(), minlength=11)
    assert counts.numel() == 11 and bool((counts > 0).all())  # every digit occurs
    assert 0.6 < counts[0] / counts.sum() < 0.95  # mostly background, as scenes are
    assert SCENE_SETS["scenes_mixed"].classes()[11] == "T-shirt/top" and len(SCENE_SETS["scenes_mixed"].classes()) == 21


def test_labels_are_the_object_masks_painted_in_order():
    """Square objects of known classes on a plain background: a pixel is labelled with the class of the
    last object whose mask covers it, and its brightness is that object's."""
    square = np.full((1, 6, 6), 255, dtype=np.uint8)
    pools = [(square, np.array([2]), 0), (square, np.array([6]), 0)]
    spec = SceneSpec("digits", size=24, objects=(3, 3), object_size=(6, 10), backgrounds=("plain",), max_overlap=1.0)
    for i in range(20):
        image, labels = render_scene(spec, pools, np.random.default_rng(i))
        fg = labels > 0
        assert set(np.unique(labels)) <= {0, 3, 7}
        assert bool(fg.any())
        assert bool((image[fg] >= 0.7 - 1e-6).all()) and bool((image[~fg] <= 0.2 + 1e-6).all())
    # the overlap rule: with max_overlap 0, no object mask lies on another
    spec0 = SceneSpec("digits", size=24, objects=(3, 3), object_size=(8, 8), backgrounds=("plain",), max_overlap=0.0)
    for i in range(20):
        image, labels = render_scene(spec0, [(square, np.array([0]), 0)], np.random.default_rng(i))
        assert (labels > 0).sum() % 64 == 0  # whole 8x8 squares only, none covering another


def test_real_mnist_scenes_when_the_files_are_there():
    if not (DATA / "mnist_test.npz").is_file():
        pytest.skip(f"MNIST is not in {DATA}")
    data = make_scenes(SCENE_SETS["scenes_mnist"], "test", n=20, root=DATA)
    assert data.image_shape == (1, 64, 64) and data.num_classes == 11 and data.describe["source"] == "mnist"
    assert 0.5 < float((data.y == 0).float().mean()) < 0.97
    small = make_scenes(SCENE_SETS["scenes_mnist"].at_size(48), "test", n=5, root=DATA)
    assert small.image_shape == (1, 48, 48) and small.describe["object_size"] == (15, 27)


def test_image_size_makes_the_scenes_at_that_size():
    data = load_dataset("scenes-digits", "test", image_size=24)
    assert data.image_shape == (1, 24, 24) and data.labels.shape == (500, 24, 24)


def test_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(RobustlabError) as err:
        load_dataset("scenes-mnist", "train", root=tmp_path)
    text = str(err.value)
    assert text.startswith("data set 'scenes_mnist' builds its scenes from mnist (train), which is missing")
    assert "never downloads" in text and str(tmp_path) in text


def test_transforms_are_refused_on_per_pixel_labels():
    with pytest.raises(RobustlabError, match="per-pixel labels; a transform would move the pixels"):
        load_dataset("scenes-digits", "test", transform=lambda x, g=None: x)


# ------------------------------------------------------------------------------------ losses and metric


def test_dense_loss_is_the_mean_over_pixels():
    logits = torch.randn(3, 5, 4, 6)
    labels = torch.randint(0, 5, (3, 4, 6))
    per_pixel = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(cross_entropy(logits, labels), per_pixel.flatten(1).mean(dim=1))


def test_miou_counts_add_over_batches():
    gen = torch.Generator().manual_seed(0)
    pred, labels = torch.randint(0, 4, (10, 5, 5), generator=gen), torch.randint(0, 4, (10, 5, 5), generator=gen)
    c, i, u = confusion_counts(pred, labels, 4)
    whole = SegmentationScore(4).update("v", [25] * 10, c, i, u).compute()["v"]
    parts = [SegmentationScore(4).update("v", [25] * 5, c[s], i[s], u[s]) for s in (slice(0, 5), slice(5, 10))]
    assert parts[0].merge(parts[1]).compute()["v"] == whole
    assert whole["pixel_accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    ious = [float(((pred == k) & (labels == k)).sum() / ((pred == k) | (labels == k)).sum()) for k in range(4)]
    assert whole["mean_iou"] == pytest.approx(sum(ious) / 4)


# ------------------------------------------------------------------------------------ model, training, attacks


def test_trained_unet_beats_the_all_background_baseline(seg_model, scenes_test, tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        result = run(seg_model, scenes_test, SegmentationProtocol([create_attack("pgd", THREAT, steps=5)], 11), store,
                     batch_size=16)
    s = result.summary
    background = float((scenes_test.y == 0).float().mean())
    baseline_miou = background / 11  # all background: IoU_bg = its pixel share, every other class 0
    assert s["clean_pixel_accuracy"] > background + 0.03
    assert s["clean_miou"] > baseline_miou + 0.08
    assert s["clean_pixel_accuracy"] == pytest.approx(accuracy(seg_model, scenes_test))
    # PGD on the per-pixel loss lowers mIoU and pixel accuracy, with every image re-checked
    assert s["robust_miou"] < s["clean_miou"] - 0.02 and s["robust_pixel_accuracy"] < s["clean_pixel_accuracy"]
    assert {c["name"]: c["status"] for c in result.checks}["verification"] == "pass"
    assert s["attacks"][0]["worst_for"] > 0 and s["rejected"] == 0


@pytest.mark.parametrize("name", ["pgd", "apgd-ce"])
def test_attacks_on_the_per_pixel_loss_stay_in_the_ball(seg_model, scenes_test, name):
    x, y = scenes_test.batch(range(16))
    attack = create_attack(name, THREAT, steps=5)
    result = attack.run(seg_model, x, y, torch.Generator().manual_seed(0))
    assert bool(THREAT.contains(result.x_adv, x).all())
    assert float((result.x_adv - x).abs().max()) <= THREAT.eps + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    with torch.no_grad():
        before = cross_entropy(seg_model(x), y).mean()
        after = cross_entropy(seg_model(result.x_adv), y).mean()
    assert after > before  # the mean per-pixel loss went up
    assert int(result.gradients.min()) == 5  # no sample retires early: not every pixel is wrong


def test_pgd_adversarial_training_runs_on_per_pixel_labels(scenes_test):
    torch.manual_seed(0)
    model = create_model("seg_unet", num_classes=11, width=4, depth=1)
    history = train(model, scenes_test.subset(32), TrainConfig(epochs=1, batch_size=16, lr=0.01, optimizer="adam",
                                                                  val_n=8, val_steps=2),
                    create_objective("pgd-at", THREAT, steps=2), progress=False)
    record = history[-1]
    assert np.isfinite(record["loss"]) and 0.0 <= record["train_adv_acc"] <= 1.0
    assert 0.0 <= record["val_robust_acc"] <= record["val_clean_acc"] + 0.05  # pixel accuracies


# ------------------------------------------------------------------------------------ protocol


def _rows(store, run_id, task):
    return [tuple(r)[1:] for r in store.sample_rows(SegmentationProtocol.sample_table, run_id, task)]  # all but run_id


def test_killed_and_resumed_run_equals_an_uninterrupted_one(seg_model, scenes_test, tmp_path, monkeypatch):
    data = scenes_test.subset(32)
    protocol = lambda: SegmentationProtocol([create_attack("pgd", THREAT, steps=3)], 11, eps_grid=(0.05,))
    with ResultsStore(tmp_path / "full.db") as store:
        full = run(seg_model, data, protocol(), store, seed=3, batch_size=8)
        full_rows = {t["task"]: _rows(store, full.run_id, t["task"]) for t in store.tasks(full.run_id)}
    calls = {"n": 0}
    original = SegmentationProtocol.run_batch

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second task
            raise Crash("killed")
        return original(self, *args, **kwargs)

    with ResultsStore(tmp_path / "resumed.db") as store:
        monkeypatch.setattr(SegmentationProtocol, "run_batch", crashing)
        with pytest.raises(Crash):
            run(seg_model, data, protocol(), store, seed=3, batch_size=8)
        run_id = store.list_runs()[0]["run_id"]
        monkeypatch.undo()
        resumed = run(seg_model, data, protocol(), store, seed=3, batch_size=8, resume=True)
        rows = {t["task"]: _rows(store, run_id, t["task"]) for t in store.tasks(run_id)}
    assert resumed.resumed and rows == full_rows
    assert resumed.summary["robust_miou"] == full.summary["robust_miou"]
    assert [p["eps"] for p in full.summary["eps_curve"]] == [0.0, 0.05, 0.1]
    miou = [p["mean_iou"] for p in full.summary["eps_curve"]]
    assert miou[0] >= miou[1] >= miou[2]


def test_report_page_and_leaderboard_columns(seg_model, scenes_test, tmp_path):
    from robustlab.report.html import write_report
    from robustlab.report.leaderboard import leaderboard

    with ResultsStore(tmp_path / "r.db") as store:
        result = run(seg_model, scenes_test.subset(8), SegmentationProtocol([create_attack("fgsm", THREAT)], 11), store)
        paths = write_report(store, result.run_id, tmp_path / "rep")
        groups = leaderboard(store)
    html = paths["html"].read_text()
    assert "Segmentation report" in html and "IoU per class" in html
    assert json.loads(paths["summary"].read_text())["summary"]["robust_miou"] == result.summary["robust_miou"]
    (group,) = groups
    assert group.protocol == "segmentation" and group.columns[:2] == ("robust_miou", "clean_miou")
    assert "robust mIoU" in group.title and group.rows[0].rank == 1


# ------------------------------------------------------------------------------------ the error lines


def test_segmentation_model_as_classifier_and_the_reverse(seg_model, scenes_test, tmp_path):
    with pytest.raises(RobustlabError, match=r"^the model returns per-pixel logits of shape \(2, 11, 8, 8\) "
                       r"\(N, classes, H, W\): it is a segmentation model and cannot be evaluated as a classifier"):
        check_logits(seg_model(torch.rand(2, 1, 8, 8)), 2)
    with pytest.raises(RobustlabError, match=r"^the model returns one prediction per image, logits of shape \(2, 10\)"):
        check_logits(torch.zeros(2, 10), 2, dense=True)
    digits = load_dataset("digits", "test").subset(16)
    classifier = create_model("digits_mlp")
    with ResultsStore(tmp_path / "r.db") as store:
        # a segmentation model through the classifier protocol, on image-level labels
        with pytest.raises(RobustlabError, match="it is a segmentation model and cannot be evaluated as a classifier"):
            run(seg_model, digits, AdversarialProtocol([create_attack("pgd", THREAT)]), store)
        # a classifier through the segmentation protocol, and data of the wrong kind for each protocol
        with pytest.raises(RobustlabError, match="it is a classifier and cannot be evaluated as a segmentation model"):
            run(classifier, _as_scenes_of(digits), SegmentationProtocol([create_attack("pgd", THREAT)], 10), store)
        with pytest.raises(RobustlabError, match=r"^data set 'scenes_digits' has per-pixel labels \(segmentation\); "
                           "the adversarial protocol evaluates classifiers$"):
            run(seg_model, scenes_test, AdversarialProtocol([create_attack("pgd", THREAT)]), store)
        with pytest.raises(RobustlabError, match=r"^data set 'digits' has one label per image; the segmentation"):
            run(seg_model, digits, SegmentationProtocol([create_attack("pgd", THREAT)], 11), store)
    with pytest.raises(RobustlabError, match=r"^attack\(s\) square do not attack segmentation models; use apgd-ce"):
        SegmentationProtocol([create_attack("square", THREAT)], 11)
    with pytest.raises(RobustlabError, match="^attack 'cw' does not attack segmentation models"):
        create_attack("cw", ThreatModel("l2", 1.0), steps=2).run(seg_model, *scenes_test.batch(range(2)))


def _as_scenes_of(digits):
    """Digits as a per-pixel data set (every pixel labelled with the image's class)."""
    from robustlab.data import DenseDataset

    x, y = digits.batch(range(len(digits)))
    return DenseDataset("digits_dense", "test", x, y[:, None, None].expand(-1, 8, 8).clone(), list(digits.classes))


def test_card_records_the_task():
    card = ModelCard.for_architecture("seg_unet", num_classes=11)
    assert card.task == "segmentation"
    assert ModelCard.from_dict({k: v for k, v in card.to_dict().items() if k != "task"}).task == "classification"
    with pytest.raises(RobustlabError, match="task must be one of classification, segmentation"):
        ModelCard.from_dict({**card.to_dict(), "task": "detection"})


def test_cli_eval_picks_the_segmentation_protocol_and_certify_refuses(seg_model, tmp_path, capsys):
    from robustlab.cli import main
    from robustlab.models import save_checkpoint

    path = tmp_path / "seg.safetensors"
    save_checkpoint(seg_model, path, ModelCard.for_architecture("seg_unet", num_classes=11,
                                                                arch_kwargs={"width": 8, "depth": 2}))
    db = str(tmp_path / "r.db")
    capsys.readouterr()
    assert main(["eval", "--model", str(path), "--data", "scenes-digits", "--n", "8", "--norm", "linf", "--eps", "0.1",
                 "--attack", "pgd:steps=2", "--db", db, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "segmentation" and out["n"] == 8 and out["robust_miou"] <= out["clean_miou"]
    assert main(["certify", "--model", str(path), "--data", "digits", "--samples", "2", "--sigma", "0.25", "--n", "10", "--n0", "5",
                 "--db", db]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("robustlab: error: the model returns per-pixel logits of shape (2, 11, 8, 8) (N, classes, H, W): it "
                   "is a segmentation model and cannot be evaluated as a classifier; use `robustlab eval` (it picks the "
                   "segmentation protocol) or robustlab.eval.protocols.SegmentationProtocol")]


def test_a_defended_segmentation_model_is_attacked_adaptively(seg_model, scenes_test, tmp_path):
    from robustlab.defenses import DefendedModel, build_defenses
    from robustlab.eval.runner import segment

    defended = DefendedModel(seg_model, build_defenses(["noise:sigma=0.05"]))
    with ResultsStore(tmp_path / "r.db") as store:
        result = segment(defended, scenes_test.subset(4), [create_attack("pgd", THREAT, steps=2)], store)
    assert [d["name"] for d in result.summary["defenses"]] == ["noise"]
    assert result.summary["attacks"][0]["params"]["eot"] > 1  # gradients averaged over the noise draws
