"""The command line: train, eval (JSON contract, bad input, kill and resume), report, leaderboard."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robustlab.cli import main

EVAL = ["eval", "--data", "digits", "--norm", "linf", "--eps", "0.1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "6", "--batch-size", "64",
                 "--out", str(out), "--device", "cpu"]) == 0
    return out


def _cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_train_writes_checkpoint_with_card(checkpoint):
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    assert card["architecture"] == "digits_cnn" and card["clean_accuracy"] > 0.9
    assert len(card["sha256"]) == 64 and card["training"]["recipe"] == "standard"


def test_eval_json_contract(checkpoint, tmp_path, capsys):
    db = tmp_path / "r.db"
    code = main([*EVAL, "--model", str(checkpoint), "--n", "100", "--attack", "fgsm",
                 "--attack", "pgd:steps=10,alpha=0.02,restarts=1,random_start=true,loss=ce",
                 "--eps-grid", "0.05,0.2", "--db", str(db), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"run_id", "n", "clean_accuracy", "robust_accuracy", "attacks"} <= set(out)
    assert out["n"] == 100
    assert [a["name"] for a in out["attacks"]] == ["fgsm", "pgd"]
    assert out["attacks"][1]["params"]["alpha"] == 0.02 and out["attacks"][1]["params"]["steps"] == 10
    assert all({"name", "params", "robust_accuracy", "seconds"} <= set(a) for a in out["attacks"])
    assert out["ensemble_robust_accuracy"] == out["attacks"][-1]["robust_accuracy"] <= out["attacks"][0]["robust_accuracy"]
    assert out["robust_accuracy"] <= out["ensemble_robust_accuracy"]  # the worst case over the whole run
    assert out["robust_accuracy"] < out["clean_accuracy"]
    for key in ("clean", "robust"):  # the 95% interval of a proportion on 100 images: a few points either side
        low, high = out["ci95"][key]
        assert low <= out[f"{key}_accuracy"] <= high
        assert 0.0 <= low and high <= 1.0 and 0.02 < high - low < 0.2
    assert [p["eps"] for p in out["eps_curve"]] == [0.0, 0.05, 0.1, 0.2]
    # The report and the leaderboard read the same store.
    assert main(["report", out["run_id"][:6], "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64," in html
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["summary"]["robust_accuracy"] == out["robust_accuracy"]
    assert main(["leaderboard", "--db", str(db), "--site", str(tmp_path / "lb")]) == 0
    assert out["run_id"] in capsys.readouterr().out
    assert out["run_id"] in (tmp_path / "lb" / "index.html").read_text()
    assert (tmp_path / "lb" / "runs" / out["run_id"] / "report.html").is_file()


def test_model_as_entry_point(tmp_path, capsys):
    file = tmp_path / "mymodel.py"
    file.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    assert main([*EVAL, "--model", f"{file}:build", "--n", "40", "--db", str(tmp_path / "r.db"), "--json",
                 "--attack", "fgsm", "--steps-grid", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["--norm", "l3"], "unknown norm"),
        (["--eps", "-0.1"], "epsilon must be"),
        (["--eps", "nan"], "epsilon must be"),
        (["--attack", "nosuch"], "unknown attack"),
        (["--attack", "pgd:stepz=3"], "has no parameter stepz"),
        (["--attack", "pgd:steps=0"], "steps must be >= 1"),
        (["--attack", "pgd:loss=mse"], "loss"),
        (["--data", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
        (["--model", "no_such_model"], "no_such_model"),
        (["--n", "0"], "--n must be"),
    ],
)
def test_bad_input_gives_one_clear_error_and_keeps_the_store(checkpoint, tmp_path, capsys, args, message):
    db = tmp_path / "r.db"
    assert main([*EVAL, "--model", str(checkpoint), "--n", "20", "--db", str(db), "--attack", "fgsm",
                 "--steps-grid", "none"]) == 0
    text = capsys.readouterr().out
    assert "robust accuracy" in text and "95% CI" in text and "(n = 20)" in text
    argv = [*EVAL, "--model", str(checkpoint), "--n", "20", "--db", str(db), "--steps-grid", "none", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    assert con.execute("SELECT COUNT(*) FROM adversarial_samples").fetchone()[0] >= 20


def test_bad_data_files_fail_clearly(checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    x = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    np.savez(root / "mnist_test.npz", x=x, y=np.full(10, 12, dtype=np.int64))  # labels outside 10 classes
    assert main([*EVAL, "--model", str(checkpoint), "--data", "mnist", "--data-root", str(root),
                 "--db", str(tmp_path / "r.db")]) == 2
    assert "labels" in capsys.readouterr().err


def test_bad_argument_values_exit_2_without_traceback(tmp_path):
    res = _cli("eval", "--model", "digits_cnn", "--data", "digits", "--norm", "linf", "--eps", "abc")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "abc" in res.stderr


def _sample_rows(db: Path, run_id: str) -> list[tuple]:
    con = sqlite3.connect(db)
    return con.execute("SELECT task, sample_index, clean_correct, robust, broken_by, adv_pred FROM adversarial_samples"
                       " WHERE run_id = ? ORDER BY task, sample_index", (run_id,)).fetchall()


def test_killed_run_resumes_to_the_same_numbers(checkpoint, tmp_path):
    args = [*EVAL, "--model", str(checkpoint), "--n", "256", "--batch-size", "16", "--attack", "fgsm",
            "--attack", "pgd:steps=20", "--eps-grid", "0.05,0.2", "--seed", "7", "--json"]
    full_db, killed_db = tmp_path / "full.db", tmp_path / "killed.db"
    full = _cli(*args, "--db", str(full_db))
    assert full.returncode == 0, full.stderr
    full_out = json.loads(full.stdout)

    proc = subprocess.Popen([sys.executable, "-m", "robustlab", *args, "--db", str(killed_db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            done = sqlite3.connect(killed_db).execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 12:
            break
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = sqlite3.connect(killed_db).execute("SELECT status FROM runs").fetchone()[0]
    assert status == "running"  # SIGKILL leaves no chance to say anything

    resumed = _cli(*args, "--db", str(killed_db), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["resumed"] and "resuming run" in resumed.stderr
    for key in ("n", "clean_accuracy", "robust_accuracy", "eps_curve", "steps_curve"):
        assert out[key] == full_out[key]
    assert [a["robust_accuracy"] for a in out["attacks"]] == [a["robust_accuracy"] for a in full_out["attacks"]]
    assert _sample_rows(killed_db, out["run_id"]) == _sample_rows(full_db, full_out["run_id"])


def test_report_of_unknown_run_and_missing_store(tmp_path, capsys):
    assert main(["report", "abc", "--db", str(tmp_path / "none.db")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_perturb_a_folder_without_labels(checkpoint, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main(["perturb", "--model", str(checkpoint), "--norm", "linf", "--eps", "0.1", "--images", str(images),
                 "--out", str(out), "--attack", "ssp:steps=10"]) == 0
    assert "4 images written" in capsys.readouterr().err
    for i in range(4):
        clean = np.asarray(Image.open(images / f"{i}.png"), dtype=np.float64) / 255
        adv = np.asarray(Image.open(out / f"{i}.png"), dtype=np.float64) / 255
        assert adv.shape == clean.shape and np.abs(adv - clean).max() <= 0.1 + 1e-6
