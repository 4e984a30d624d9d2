"""Progress of long work: lines in a log when standard error is not a terminal."""

from __future__ import annotations

import io
import re

import torch

from robustlab import progress as progress_module
from robustlab.attacks import build_attacks
from robustlab.eval.runner import EvalOptions, evaluate
from robustlab.eval.store import ResultsStore
from robustlab.models import create_model
from robustlab.progress import LineProgress, progress
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, train


def test_line_progress_reports_count_share_time_left_and_figures():
    out = io.StringIO()
    bar = LineProgress(range(4), desc="epoch 1/2", unit="batch", interval=0.0, stream=out)
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.2f}")
    lines = out.getvalue().splitlines()
    # One line per step but the last (the caller reports the end itself).
    assert len(lines) == 3 and lines[0].startswith("epoch 1/2: 1/4 batch (25%), 0:00 elapsed, about 0:00 left")
    assert lines[2].endswith("; loss=0.33") and "3/4 batch (75%)" in lines[2]
    quiet = io.StringIO()
    bar = LineProgress(total=10, desc="evaluating", interval=3600.0, stream=quiet)
    bar.update(5)
    assert quiet.getvalue() == ""


def test_progress_picks_lines_off_a_terminal_and_can_be_silenced(capsys):
    # Under pytest standard error is captured, not a terminal.
    assert isinstance(progress(total=3, desc="x"), LineProgress)
    silent = progress(total=3, desc="x", enabled=False)
    assert not isinstance(silent, LineProgress) and silent.disable


def test_training_in_a_log_prints_progress_lines(digits_train, capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)
    torch.manual_seed(0)
    train(create_model("digits_cnn"), digits_train.subset(256), TrainConfig(epochs=1, batch_size=64))
    err = capsys.readouterr().err
    assert "epoch 1/1: 1/4 batch (25%)" in err and "epoch 1/1: 3/4 batch (75%)" in err and "loss=" in err


def test_evaluation_in_a_log_names_the_attack_running_within_a_batch(digits_model, digits_test, capsys, monkeypatch,
                                                                    tmp_path):
    # A batch of the standard suite can take many minutes: the log says which attack is on which points.
    monkeypatch.setattr(progress_module, "INTERVAL", 0.0)
    attacks = build_attacks(["fgsm", "pgd:steps=3"], ThreatModel("linf", 0.1))
    with ResultsStore(tmp_path / "runs.db") as store:
        evaluate(digits_model, digits_test.subset(64), attacks, store,
                 options=EvalOptions(batch_size=32, steps_grid=(), sanity=False))
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("evaluating: 0/2 batch (0%)") and "time left unknown yet" in line
               and re.search(r"main, batch 1: fgsm on \d+ robust points$", line) for line in lines), lines
    # PGD runs second, on the points FGSM left robust.
    def points(attack: str, batch: int) -> int:
        found = [re.search(rf"batch {batch}: {attack} on (\d+) robust points$", line) for line in lines]
        return next(int(m.group(1)) for m in found if m)

    for b in (1, 2):
        assert points("pgd", b) < points("fgsm", b) <= 32
