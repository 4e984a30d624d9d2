"""Failures a new user met (issue 19) end in one clear line, or work: version, epsilons written in the
wrong units or dividing by zero, a reader that goes away, Ctrl-C messages that tell the truth, --n
beyond the data, checkpoints readable like any other file."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

import robustlab
from robustlab.cli import main

GOLDEN = Path(__file__).parent / "golden"
EVAL = ["eval", "--model", str(GOLDEN / "digits_cnn.safetensors"), "--data", "digits", "--norm", "linf",
        "--attack", "fgsm", "--no-sanity", "--steps-grid", "none"]


def _one_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("robustlab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"robustlab {robustlab.__version__}"


@pytest.mark.parametrize("eps, needle", [("8/0", "divides by zero"), ("2", "wider than the [0, 1] pixel box"),
                                         ("8", "8/255, not 8")])
def test_bad_epsilons_are_one_line_and_write_nothing(eps, needle, tmp_path, capsys):
    db = tmp_path / "r.db"
    with pytest.raises(SystemExit) as exit_:  # argparse's own error for a value it cannot convert
        code = main([*EVAL, "--eps", eps, "--db", str(db)])
        raise SystemExit(code)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and "internal error" not in err
    assert not db.exists()


def test_a_reader_that_goes_away_ends_quietly(tmp_path, capsys, monkeypatch):
    zoo = tmp_path / "zoo"
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(GOLDEN / f"digits_cnn{suffix}", tmp_path / f"m{suffix}")
    assert main(["zoo", "add", str(tmp_path / "m.safetensors"), "--name", "m", "--zoo", str(zoo)]) == 0
    capsys.readouterr()

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    saved = os.dup(1)  # main points fd 1 at /dev/null: put the real one back afterwards
    try:
        monkeypatch.setattr("sys.stdout", ClosedPipe())
        assert main(["zoo", "show", "m", "--zoo", str(zoo)]) == 141
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert capsys.readouterr().err == ""


def test_ctrl_c_says_what_each_command_saved(monkeypatch, capsys, tmp_path):
    import robustlab.cli.train as train_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "cmd_train", interrupted)
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--out", str(tmp_path / "x.safetensors")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "after every finished epoch" in err and "batches" not in err


def test_n_beyond_the_data_is_said(tmp_path, capsys):
    assert main([*EVAL, "--eps", "0.1", "--n", "100000", "--db", str(tmp_path / "r.db")]) == 0
    err = capsys.readouterr().err
    assert "--n 100000 is more than the 445 images of digits:test; using all 445" in err


def test_checkpoints_respect_the_umask(tmp_path):
    from robustlab.models import create_model, save_checkpoint
    from robustlab.models.card import ModelCard

    old = os.umask(0o022)
    try:
        path = save_checkpoint(create_model("digits_cnn", num_classes=10), tmp_path / "m.safetensors",
                               ModelCard.for_architecture("digits_cnn", num_classes=10, in_channels=1, dataset="digits"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o644


def test_an_architecture_for_another_image_size_is_one_line(tmp_path, capsys):
    """smallcnn is built for 28x28 MNIST; the embedded digits are 8x8: said before training starts."""
    out = tmp_path / "x.safetensors"
    assert main(["train", "--model", "smallcnn", "--data", "digits", "--epochs", "1", "--n", "50",
                 "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("robustlab:")]
    assert len(err) == 1 and "built for 1-channel (grey) 28x28 images; digits has 1x8x8 images" in err[0]
    assert not out.exists()
