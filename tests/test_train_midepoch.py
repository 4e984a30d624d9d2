"""Training state is saved inside long epochs too (issue 19 item 8): a run killed in the middle of an
epoch resumes from the last in-epoch save and ends with the same weights, bit for bit, as a run that
was never stopped (dropout draws, batch-norm statistics, momentum and the learning-rate schedule
included); Ctrl-C in `train` says what was saved."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustlab.cli import main
from robustlab.training import TrainConfig, train
from robustlab.training import loop as training_loop

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=3)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(8 * 8 * 8, 10))


def _kill_at(monkeypatch, call: int) -> None:
    """Ctrl-C during the objective's ``call``-th call (batch ``call`` counted over the run, 1-based)."""
    real, calls = training_loop._call_objective, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, "_call_objective", interrupted)


def test_killed_mid_epoch_resumes_to_identical_weights(digits_train, tmp_path, monkeypatch):
    data = digits_train.subset(96)  # 6 batches per epoch
    whole = _net()
    history = train(whole, data, CONFIG, progress=False, checkpoint_dir=tmp_path / "whole")

    state_dir = tmp_path / "killed"
    killed = _net()
    _kill_at(monkeypatch, 6 + 4)  # the 4th batch of the second epoch: 3 of its batches are done
    with pytest.raises(KeyboardInterrupt):
        train(killed, data, CONFIG, progress=False, checkpoint_dir=state_dir, save_every=0)
    meta = json.loads((state_dir / "state.json").read_text())
    assert meta["epoch"] == 1 and meta["within"]["batch"] == 3 and not meta["finished"]
    assert [p.name for p in state_dir.glob("*.safetensors")] == ["epoch-0001-batch-000003.safetensors"]
    monkeypatch.undo()

    resumed = _net()
    again = train(resumed, data, CONFIG, progress=False, checkpoint_dir=state_dir, resume=True, save_every=0)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in again] == [r["loss"] for r in history]


def test_ctrl_c_in_train_says_what_was_saved(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.safetensors"
    args = ["train", "--model", "digits_cnn", "--data", "digits", "--n", "200", "--epochs", "2", "--batch-size", "16",
            "--out", str(out), "--device", "cpu"]
    _kill_at(monkeypatch, 3)
    assert main([*args, "--save-every-minutes", "0"]) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("robustlab: interrupted;") and "epoch 1, batch 2 of 13" in err and "--resume" in err
    assert str(tmp_path / "m.train") in err
    monkeypatch.undo()
    _kill_at(monkeypatch, 2)
    assert main([*args, "--out", str(tmp_path / "n.safetensors")]) == 130  # default: the first save is later
    err = capsys.readouterr().err.splitlines()[-1]
    assert "nothing was saved yet" in err and "end of epoch 1" in err
