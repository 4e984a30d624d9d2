"""Pretraining robustlab's tiny CLIP from the command line: ``robustlab adapt --recipe clip-contrastive``
gives the library's model, resumes to it after an interruption, and refuses what does not apply."""

from __future__ import annotations

import pytest
import torch

from robustlab.cli import main
from robustlab.training import TrainConfig
from robustlab.vlm.loading import load_vlm
from robustlab.vlm.pretrain import caption_sources, pretrain_tiny_clip
from robustlab.vlm.tiny_clip import TinyCLIPConfig, load_tiny_clip, read_tiny_clip_card

SIZES = "image_size=16,patch_size=4,vision_width=32,vision_layers=2,text_width=32,text_layers=1,embed_dim=32"
SMALL = TinyCLIPConfig(image_size=16, patch_size=4, vision_width=32, vision_layers=2, text_width=32, text_layers=1,
                       embed_dim=32)
ARGS = ["adapt", "--recipe", "clip-contrastive", "--data", "digits", "--n", "256", "--tiny-config", SIZES,
        "--epochs", "2", "--batch-size", "64", "--lr", "3e-3", "--weight-decay", "0", "--seed", "3"]


def _state(path):
    return load_tiny_clip(path).state_dict()


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "tiny.safetensors"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_cli_pretraining_is_the_library_pretraining(cli_model):
    sources = caption_sources(["digits"], image_size=16)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, optimizer="adam", weight_decay=0.0, seed=3)
    model, history, _ = pretrain_tiny_clip(sources, SMALL, cfg, per_source=256, progress=False)
    cli = _state(cli_model)
    assert set(cli) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(cli[key], value), key
    assert history[-1]["loss"] < history[0]["loss"]
    card = read_tiny_clip_card(cli_model)
    assert card.config["vision_width"] == 32 and card.training["sources"][0]["images"] == 256
    assert len(card.training["sources"][0]["classes"]) == 10
    vlm, info = load_vlm(f"tiny:{cli_model}")  # the output is a tiny: model for zeroshot and adapt
    assert info["weights_sha256"] == card.sha256 and vlm.image_size == 16


def test_an_interrupted_cli_pretraining_resumes_to_the_uninterrupted_weights(cli_model, tmp_path, monkeypatch, capsys):
    import robustlab.cli.adapt as adapt_cli

    out = tmp_path / "resumed.safetensors"
    say = adapt_cli._epoch_line

    def stop_after_first(record):
        say(record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(adapt_cli, "_epoch_line", stop_after_first)
    assert main([*ARGS, "--out", str(out)]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(adapt_cli, "_epoch_line", say)
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    resumed, reference = _state(out), _state(cli_model)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize(("extra", "message"), [
    (["--eps", "4/255"], "recipe 'clip-contrastive' pretrains a new tiny CLIP from scratch; leave out --eps"),
    (["--vlm", "tiny:x"], "leave out --vlm"),
    (["--mode", "last:blocks=1"], "leave out --mode"),
    (["--tiny-config", "depth=3"], "tiny-clip config has unknown fields: depth"),
])
def test_pretraining_refuses_what_does_not_apply_in_one_line(extra, message, tmp_path, capsys):
    args = [*ARGS, "--out", str(tmp_path / "x"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("robustlab: error:")


def test_adaptation_recipes_still_need_a_model_and_a_radius(tmp_path, capsys):
    assert main(["adapt", "--data", "digits", "--recipe", "tecoa", "--eps", "1/255", "--out", str(tmp_path / "a")]) == 2
    assert "recipe 'tecoa' needs --vlm" in capsys.readouterr().err
    assert main(["adapt", "--vlm", "tiny:x", "--data", "digits", "--recipe", "fare", "--out", str(tmp_path / "a")]) == 2
    assert "recipe 'fare' needs --eps" in capsys.readouterr().err
    assert main(["adapt", "--data", "digits", "--recipe", "clip-contrastive:prompts=1", "--out", str(tmp_path / "a")]) == 2
    assert "takes no parameters" in capsys.readouterr().err
