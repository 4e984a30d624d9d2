"""The Neural Representation Purifier: label-free training, checkpoints and resume, the ``nrp``
defense in evaluations (attacked through the purifier), ``robustlab purify`` and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.attacks import create_attack
from robustlab.attacks.ssp import FeatureExtractor
from robustlab.cli import main
from robustlab.defenses import apply_defenses
from robustlab.errors import RobustlabError
from robustlab.eval import EvalOptions, ResultsStore, evaluate
from robustlab.models import ModelCard, save_checkpoint
from robustlab.models.purifier import build_purifier, load_purifier, save_purifier
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig
from robustlab.training.purifier import NRPObjective, PurifierConfig, default_layer, train_purifier

EPS = 0.3


def _config(epochs: int = 2, steps: int = 3) -> PurifierConfig:
    return PurifierConfig(eps=EPS, steps=steps, train=TrainConfig(epochs=epochs, batch_size=64, lr=2e-3,
                                                                   optimizer="adam", weight_decay=0.0, seed=0))


@pytest.fixture(scope="module")
def trained(digits_model, digits_train, tmp_path_factory):
    """A purifier trained on 448 digits against the digits classifier (its deepest feature map)."""
    run = train_purifier(digits_train.subset(448), digits_model, "digits_cnn (conftest)", _config(), progress=False)
    path = save_purifier(run.purifier, tmp_path_factory.mktemp("nrp") / "p.safetensors", "residual", {}, (8, 8),
                         run.record, dataset="digits:train[448]")
    return run, path


def _ssp_distance(purify, features, x, seed=0):
    """Relative squared feature distance to the clean images after SSP at EPS (against the features)."""
    attack = create_attack("ssp", ThreatModel("linf", EPS), layer=features.layer, steps=10)
    x_adv = attack.run(features.model, x, torch.zeros(len(x), dtype=torch.long), torch.Generator().manual_seed(seed)).x_adv
    with torch.no_grad():
        clean = features(x)
        out = features(purify(x_adv))
    return float(((out - clean).flatten(1).square().sum(1) / clean.flatten(1).square().sum(1)).mean())


def test_untrained_purifier_is_the_identity_for_any_channels():
    for arch in ("residual", "dense"):
        for channels in (1, 3, 4):
            x = torch.rand(2, channels, 9, 7)
            assert torch.equal(build_purifier(arch, channels)(x), x)
    with pytest.raises(RobustlabError, match="purifier architecture"):
        build_purifier("unet", 3)


def test_training_reduces_the_feature_loss_on_held_out_digits(trained, digits_model, digits_test):
    run, path = trained
    history = run.history
    assert history[-1]["train_feature_loss"] < 0.75 * history[-1]["train_feature_loss_unpurified"]
    features = FeatureExtractor(digits_model, run.record["layer"])
    assert run.record["layer"] == "net.pool2"  # the deepest spatial feature map by default
    x = digits_test.x[:200]
    before = _ssp_distance(lambda z: z, features, x)
    after = _ssp_distance(run.purifier, features, x)
    assert after < 0.75 * before, (before, after)
    with torch.no_grad():
        out = run.purifier(x)
    assert out.min() >= 0 and out.max() <= 1
    purifier, card = load_purifier(path)
    assert torch.equal(purifier(x), out)
    t = card.training
    assert card.in_channels == 1 and card.input_size == (8, 8) and card.dataset == "digits:train[448]"
    assert t["feature_network"] == "digits_cnn (conftest)" and t["layer"] == "net.pool2" and t["epochs"] == 2
    assert t["losses"] == {"feature": 1.0, "pixel": 1.0, "adversarial": 0.0} and t["ssp"]["eps"] == EPS


def test_resume_in_the_middle_of_an_epoch_gives_the_uninterrupted_weights(digits_model, digits_train, tmp_path,
                                                                           monkeypatch):
    data = digits_train.subset(192)
    config = _config(epochs=2, steps=2)
    config.adv_weight = 0.005  # the discriminator's state is saved and resumed too
    full = train_purifier(data, digits_model, "f", config, progress=False)
    original, calls = NRPObjective.loss, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # batch 2 of epoch 2 (3 batches per epoch)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NRPObjective, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_purifier(data, digits_model, "f", config, progress=False, checkpoint_dir=tmp_path, save_every=0)
    monkeypatch.undo()
    resumed = train_purifier(data, digits_model, "f", config, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history[-1]["train_adv_loss"] > 0
    for (k, a), b in zip(full.purifier.state_dict().items(), resumed.purifier.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-6)


def test_defense_is_attacked_through_the_purifier_in_eval(trained, digits_model, digits_test, tmp_path, capsys):
    _, path = trained
    model_path = save_checkpoint(digits_model, tmp_path / "m.safetensors", ModelCard.for_architecture("digits_cnn"))
    db = tmp_path / "r.db"
    code = main(["eval", "--model", str(model_path), "--data", "digits", "--n", "40", "--norm", "linf", "--eps", "0.1",
                 "--attack", "pgd:steps=3", "--steps-grid", "", "--no-sanity", "--defense", f"nrp:purifier={path}",
                 "--db", str(db), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["defenses"][0]["name"] == "nrp" and out["defenses"][0]["params"]["clip"] == EPS  # from the card
    with ResultsStore(db) as store:
        info = store.get_run(out["run_id"])["model_info"]
    assert info["adaptive_attack"] == "gradients through nrp"
    assert out["clean_accuracy"] >= 0.75 and out["robust_accuracy"] < out["clean_accuracy"]

    # The white-box attacker's gradient reaches the input through the purifier; dynamic: EOT; bpda: identity.
    x = digits_test.x[:8].clone().requires_grad_(True)
    defended = apply_defenses(digits_model, [f"nrp:purifier={path}"])
    defended(x).sum().backward()
    assert x.grad.abs().sum() > 0
    dynamic = apply_defenses(digits_model, [f"nrp:purifier={path},dynamic=true,draws=4,sigma=0.1"])
    assert dynamic.needs().eot == 4 and dynamic.randomized and dynamic.draws == 4
    g = torch.Generator().manual_seed(0)
    noisy = dynamic.defenses[0].noise(digits_test.x[:8], g)
    assert (noisy - digits_test.x[:8]).abs().max() <= EPS + 1e-6 and not torch.equal(noisy, digits_test.x[:8])
    bpda = apply_defenses(digits_model, [f"nrp:purifier={path},attack=bpda"])
    assert bpda.needs().bpda == ("nrp",)
    data = digits_test.subset(40)
    with ResultsStore(tmp_path / "b.db") as store:
        res = evaluate(bpda, data, [create_attack("pgd", ThreatModel("linf", 0.1), steps=3)], store,
                       options=EvalOptions(steps_grid=(), sanity=False, batch_size=40, seed=0), progress=False)
        assert "BPDA through nrp" in store.get_run(res.run_id)["model_info"]["adaptive_attack"]


def _write(folder, arrays):
    for name, a in arrays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / name)


def _one_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab: error:") and needle in err[0], err


def test_purify_folder_round_trip_and_bad_input(trained, digits_test, tmp_path, capsys):
    _, path = trained
    images = tmp_path / "in"
    pixels = (digits_test.x[:4, 0] * 255).round().to(torch.uint8).numpy()
    _write(images, {"a.png": pixels[0], "sub/b.png": pixels[1], "sub/deep/c.png": pixels[2], "d.bmp": pixels[3]})
    assert main(["purify", "--images", str(images), "--out", str(tmp_path / "out"), "--purifier", str(path)]) == 0
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*"))
    assert written == ["a.png", "d.bmp", "sub/b.png", "sub/deep/c.png"]
    purifier, _ = load_purifier(path)
    with torch.no_grad():
        expected = (purifier(torch.from_numpy(pixels).float()[:, None] / 255) * 255).round().to(torch.uint8)
    got = np.asarray(Image.open(tmp_path / "out" / "sub" / "b.png"))
    assert np.array_equal(got, expected[1, 0].numpy())
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["purify", "--images", str(empty), "--out", str(tmp_path / "o1"), "--purifier", str(path)]) == 2
    _one_error(capsys, "no images in")
    _write(images, {"big.png": np.zeros((9, 9), np.uint8)})
    assert main(["purify", "--images", str(images), "--out", str(tmp_path / "o2"), "--purifier", str(path)]) == 2
    _one_error(capsys, "images of different sizes")
    assert main(["purify", "--images", str(images), "--out", str(tmp_path / "o3"), "--purifier", str(path),
                 "--size", "8"]) == 0
    capsys.readouterr()
    colour = tmp_path / "rgb"
    _write(colour, {"x.png": np.zeros((8, 8, 3), np.uint8)})
    assert main(["purify", "--images", str(colour), "--out", str(tmp_path / "o4"), "--purifier", str(path)]) == 2
    _one_error(capsys, "grey (1-channel)")
    # The defense on images whose channels the purifier was not trained for: one line.
    defended = apply_defenses(torch.nn.Identity(), [f"nrp:purifier={path}"])
    with pytest.raises(RobustlabError, match=r"trained on images with 1 channel\(s\), these have 3"):
        defended.predict(torch.rand(2, 3, 8, 8), torch.Generator().manual_seed(0))
    # A classifier checkpoint is no purifier.
    other = save_checkpoint(torch.nn.Sequential(), tmp_path / "c.safetensors",
                            ModelCard.for_entry_point("torch.nn:Sequential"))
    assert main(["purify", "--images", str(images), "--out", str(tmp_path / "o5"), "--purifier", str(other)]) == 2
    _one_error(capsys, "is not a purifier")


def test_purify_train_cli_writes_a_purifier_and_resumes(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    args = ["purify", "train", "--data", "digits", "--n", "128", "--feature-model", "digits_cnn", "--eps", "0.3",
            "--steps", "2", "--epochs", "1", "--batch-size", "64", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    card = load_purifier(out)[1]
    assert card.training["feature_network"] == "digits_cnn (random initialisation, seed 0)"
    assert (tmp_path / "p.train" / "state.json").is_file()
    first = load_purifier(out)[0].state_dict()
    assert main([*args, "--resume"]) == 0  # a finished run resumes to the same purifier
    assert all(torch.equal(first[k], v) for k, v in load_purifier(out)[0].state_dict().items())
    assert first["last.weight"].abs().sum() > 0  # it did train


def test_a_purifier_whose_output_left_the_box_is_pulled_back(digits_model, digits_train):
    """A purifier whose output is below 0 everywhere is black after its clip and passes no gradient
    through it; training's pixel loss reads the output before the clip, so the loss still has a
    gradient that brings the output back (a purifier trained at SSP 0.3 on scenes collapsed so)."""
    torch.manual_seed(0)
    purifier = build_purifier("residual", 1)
    with torch.no_grad():
        purifier.last.bias.fill_(-2.0)  # x + correction < 0 for every pixel: a black image
    x = digits_train.x[:16]
    assert torch.equal(purifier(x), torch.zeros_like(x))
    layer = default_layer(digits_model, tuple(x.shape[1:]))
    objective = NRPObjective(ThreatModel("linf", EPS), digits_model, "digits_cnn", layer=layer, steps=1)
    loss, _ = objective.loss(purifier, x, digits_train.y[:16], torch.Generator().manual_seed(0))
    loss.backward()
    assert purifier.last.bias.grad is not None and float(purifier.last.bias.grad) < -1.0  # descent raises the output
