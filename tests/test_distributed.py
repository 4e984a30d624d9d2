"""Evaluation with torchrun: two processes (gloo) merge into the store exactly what one process writes."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest
import torch

from robustlab.cli import main
from robustlab.models import ModelCard, save_checkpoint

def _free_port() -> str:
    """A TCP port free now (a fixed one collides with another run of the suite on the same machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _one_and_two_processes(args: list[str], tmp_path, capsys) -> tuple[dict, dict]:
    """``robustlab ARGS --json`` in this process into one.db and under torchrun with two processes into
    two.db: their JSON outputs (one document each: only rank 0 prints)."""
    assert main([*args, "--db", str(tmp_path / "one.db")]) == 0
    one = json.loads(capsys.readouterr().out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTLAB_BACKEND": "gloo"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
         "-m", "robustlab", *args, "--db", str(tmp_path / "two.db")],
        check=False, capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return one, json.loads(res.stdout)


ROWS = ("SELECT task, sample_index, clean_correct, robust, broken_by, adv_pred, gradients, forwards FROM adversarial_samples"
        " ORDER BY task, sample_index")


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path, digits_model, capsys):
    ckpt = save_checkpoint(digits_model, tmp_path / "m.safetensors", ModelCard.for_architecture("digits_cnn"))
    args = ["eval", "--model", str(ckpt), "--data", "digits", "--num-examples", "200", "--norm", "linf", "--eps", "0.1",
            "--attack", "fgsm", "--attack", "pgd:steps=10", "--eps-grid", "0.05", "--batch-size", "32", "--json"]
    one, two = _one_and_two_processes(args, tmp_path, capsys)
    for key in ("n", "clean_accuracy", "robust_accuracy", "eps_curve", "steps_curve"):
        assert two[key] == one[key]
    a = sqlite3.connect(tmp_path / "one.db").execute(ROWS).fetchall()
    b = sqlite3.connect(tmp_path / "two.db").execute(ROWS).fetchall()
    assert len(a) > 200 and a == b
    run = sqlite3.connect(tmp_path / "two.db").execute("SELECT model_info FROM runs").fetchone()[0]
    assert json.loads(run)["processes"] == 2


@pytest.mark.slow
def test_two_process_training_matches_one_process(tmp_path):
    """Data-parallel SGD averages the shards' gradients into the global batch's gradient, so two
    processes follow one process's trajectory up to floating-point summation order."""
    from robustlab.models import load_checkpoint

    args = ["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "3", "--batch-size", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTLAB_BACKEND": "gloo"}
    one = subprocess.run([sys.executable, "-m", "robustlab", *args, "--out", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
         "-m", "robustlab", *args, "--out", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("epoch 3:") == 1  # only rank 0 reports
    m1, c1 = load_checkpoint(tmp_path / "one.safetensors")
    m2, c2 = load_checkpoint(tmp_path / "two.safetensors")
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), k
    assert abs(c1.clean_accuracy - c2.clean_accuracy) <= 0.01


@pytest.mark.slow
def test_two_process_structured_run_equals_one_process(tmp_path, digits_model, capsys):
    """``robustlab structured`` under torchrun: rank 0 fits and keeps the universal perturbation and the
    patch, every rank evaluates its batches with them, and the store holds what one process writes."""
    ckpt = save_checkpoint(digits_model, tmp_path / "m.safetensors", ModelCard.for_architecture("digits_cnn"))
    args = ["structured", "--model", str(ckpt), "--data", "digits", "--num-examples", "96", "--fit-n", "200",
            "--batch-size", "16", "--device", "cpu", "--json", "--threat", "spatial:angle=20,shift=1,angles=9,shifts=3",
            "--threat", "universal:norm=linf,eps=0.15,epochs=3", "--threat", "patch:size=3,epochs=3,draws=3"]
    one, two = _one_and_two_processes(args, tmp_path, capsys)
    assert two["robust_accuracy"] == one["robust_accuracy"]
    rows = "SELECT * FROM structured_samples ORDER BY task, sample_index"
    a = [r[1:-1] for r in sqlite3.connect(tmp_path / "one.db").execute(rows)]  # no run id, no seconds
    b = [r[1:-1] for r in sqlite3.connect(tmp_path / "two.db").execute(rows)]
    assert len(a) == 3 * 96 and a == b
    fits = "SELECT name, data FROM run_files WHERE name NOT LIKE '%:record' ORDER BY name"  # records hold seconds
    a = sqlite3.connect(tmp_path / "one.db").execute(fits).fetchall()
    assert len(a) == 2 and a == sqlite3.connect(tmp_path / "two.db").execute(fits).fetchall()


@pytest.mark.slow
def test_two_process_detection_run_equals_one_process(tmp_path, digits_model, capsys):
    """``robustlab detect`` under torchrun: rank 0 fits the detector and its threshold and keeps them with
    the run, every rank evaluates its batches, and the store holds what one process writes."""
    ckpt = save_checkpoint(digits_model, tmp_path / "m.safetensors", ModelCard.for_architecture("digits_cnn"))
    args = ["detect", "--model", str(ckpt), "--data", "digits", "--num-examples", "64", "--batch-size", "16",
            "--detector", "mahalanobis", "--norm", "linf", "--eps", "0.1", "--fit-n", "300", "--calibration-n", "100",
            "--pgd-steps", "5", "--adaptive-steps", "5", "--adaptive-rounds", "1", "--device", "cpu", "--json"]
    one, two = _one_and_two_processes(args, tmp_path, capsys)
    keys = ("n", "threshold", "clean_accuracy", "robust_accuracy", "auc", "detection_rate", "adaptive_detection_rate")
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    rows = "SELECT * FROM detection_samples ORDER BY task, sample_index"
    a = [r[1:-1] for r in sqlite3.connect(tmp_path / "one.db").execute(rows)]  # no run id, no seconds
    b = [r[1:-1] for r in sqlite3.connect(tmp_path / "two.db").execute(rows)]
    assert len(a) >= 64 and a == b


@pytest.mark.slow
def test_two_process_segmentation_run_equals_one_process(tmp_path, capsys):
    """``robustlab eval`` of a segmentation model under torchrun writes what one process writes."""
    from robustlab.models import create_model

    torch.manual_seed(0)
    model = create_model("seg_unet", num_classes=11, width=8, depth=2).eval()
    ckpt = save_checkpoint(model, tmp_path / "seg.safetensors",
                           ModelCard.for_architecture("seg_unet", num_classes=11, arch_kwargs={"width": 8, "depth": 2}))
    args = ["eval", "--model", str(ckpt), "--data", "scenes-digits", "--num-examples", "32", "--batch-size", "8",
            "--norm", "linf", "--eps", "0.1", "--attack", "pgd:steps=2", "--device", "cpu", "--json"]
    one, two = _one_and_two_processes(args, tmp_path, capsys)
    assert two["protocol"] == "segmentation" and two["n"] == one["n"] == 32
    assert (two["clean_miou"], two["robust_miou"]) == (one["clean_miou"], one["robust_miou"])
    rows = "SELECT * FROM segmentation_samples ORDER BY task, sample_index"
    a = [r[1:] for r in sqlite3.connect(tmp_path / "one.db").execute(rows)]  # no run id
    b = [r[1:] for r in sqlite3.connect(tmp_path / "two.db").execute(rows)]
    assert len(a) >= 32 and a == b
