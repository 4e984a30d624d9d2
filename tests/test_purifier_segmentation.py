"""Label-free purifier training on segmentation data (per-pixel labels) and NRP in front of a U-Net."""

from __future__ import annotations

import torch

from robustlab.data import ImageDataset, load_dataset
from robustlab.defenses import apply_defenses
from robustlab.models import create_model
from robustlab.models.purifier import save_purifier
from robustlab.training import TrainConfig
from robustlab.training.purifier import PurifierConfig, train_purifier


def _config() -> PurifierConfig:
    return PurifierConfig(eps=0.3, steps=2, train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adam",
                                                              weight_decay=0.0, schedule="cosine", seed=0))


def test_purifier_trains_on_per_pixel_labels_exactly_as_without_labels(tmp_path):
    scenes = load_dataset("scenes-digits", "train").subset(32)
    assert scenes.y.dim() == 3  # per-pixel labels: SSP used to refuse them
    torch.manual_seed(0)
    unet = create_model("seg_unet", num_classes=11, width=4, depth=1).eval()
    run = train_purifier(scenes, unet, "seg_unet (random)", _config(), progress=False)
    unlabelled = ImageDataset("scenes_digits", "train", scenes.x, torch.zeros(len(scenes), dtype=torch.long), ["0"])
    same = train_purifier(unlabelled, unet, "seg_unet (random)", _config(), progress=False)
    a, b = run.purifier.state_dict(), same.purifier.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # labels play no part
    assert run.record["final"]["train_feature_loss_unpurified"] > 0
    # the purifier then defends the U-Net: per-pixel predictions of the right shape
    path = save_purifier(run.purifier, tmp_path / "p.safetensors", "residual", {}, (32, 32), run.record)
    defended = apply_defenses(unet, [f"nrp:purifier={path}"])
    pred = defended.predict(scenes.x[:4])
    assert pred.shape == scenes.y[:4].shape
