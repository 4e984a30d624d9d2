"""A sweep of bad inputs across every command (issue 19, "how good it must be"): paths, permissions,
names, numbers, shapes, channels, sizes, corrupt files and concurrent use. For each: exit status 2
(130 for Ctrl-C), exactly one ``robustlab: error:`` line, no traceback, and the results store
byte-identical afterwards (or, where the command legitimately wrote to it, consistent).

In-process (``robustlab.cli.main``) so the sweep stays fast. Permission cases use tests/unwritable.py
(file modes, or the immutable attribute when running as root, where file modes stop nothing)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from unwritable import unwritable

from robustlab.cli import main

GOLDEN = Path(__file__).parent / "golden"
CKPT = str(GOLDEN / "digits_cnn.safetensors")
EVAL = ["eval", "--model", CKPT, "--data", "digits", "--norm", "linf", "--eps", "0.1", "--attack", "fgsm",
        "--no-sanity", "--steps-grid", "none", "--n", "16", "--device", "cpu"]
TRAIN = ["train", "--model", "digits_cnn", "--data", "digits", "--n", "32", "--epochs", "1", "--device", "cpu"]
PERTURB = ["perturb", "--model", CKPT, "--norm", "linf", "--eps", "0.1", "--attack", "fgsm", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    db = root / "store" / "r.db"
    db.parent.mkdir()
    assert main([*EVAL, "--db", str(db)]) == 0
    (root / "text.txt").write_text("not a store\n")
    sqlite3.connect(root / "other.sqlite").execute("CREATE TABLE t (x)").connection.close()
    for name, shape in (("rgb", (8, 8, 3)), ("grey", (8, 8))):
        (root / name).mkdir()
        Image.fromarray(np.zeros(shape, np.uint8)).save(root / name / "0.png")
    (root / "empty").mkdir()
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    shutil.copyfile(GOLDEN / "digits_cnn.json", root / "corrupt.json")
    shutil.copyfile(GOLDEN / "digits_cnn.safetensors", root / "badcard.safetensors")
    (root / "badcard.json").write_text("{ half a card")
    (root / "data").mkdir()
    (root / "data" / "mnist_test.npz").write_bytes(b"PK\x03\x04 broken zip")
    (root / "state.train").mkdir()
    (root / "state.train" / "state.json").write_text("{ not json")
    (root / "folder.db").mkdir()
    (root / "zoo").mkdir()
    return {"root": root, "db": db}


# (id, argv with {db} {root} placeholders, a phrase the error line must contain)
CASES = [
    # paths
    ("eval-missing-checkpoint", [*EVAL, "--model", "{root}/none.safetensors", "--db", "{db}"], "none.safetensors"),
    ("eval-missing-data-root", [*EVAL, "--data", "mnist", "--data-root", "{root}/nowhere", "--db", "{db}"], "was not found"),
    ("eval-db-is-a-folder", [*EVAL, "--db", "{root}/folder.db"], "is a directory"),
    ("report-missing-store", ["report", "latest", "--db", "{root}/none.db"], "no results store"),
    ("report-unknown-run", ["report", "abc", "--db", "{db}"], "no run 'abc'"),
    ("report-store-is-text", ["report", "latest", "--db", "{root}/text.txt"], "not a robustlab results store"),
    ("report-store-is-other-sqlite", ["report", "latest", "--db", "{root}/other.sqlite"], "not a robustlab results store"),
    ("leaderboard-missing-store", ["leaderboard", "--db", "{root}/none.db"], "no results store"),
    ("zoo-show-unknown", ["zoo", "show", "nosuch", "--zoo", "{root}/zoo"], "nosuch"),
    ("zoo-add-missing", ["zoo", "add", "{root}/none.safetensors", "--name", "m", "--zoo", "{root}/zoo"], "no checkpoint"),
    ("zoo-add-text-file", ["zoo", "add", "{root}/text.txt", "--name", "m", "--zoo", "{root}/zoo"], "not a checkpoint"),
    ("zoo-add-run-missing-store", ["zoo", "add", CKPT, "--name", "m", "--zoo", "{root}/zoo", "--run", "latest",
                                   "--db", "{root}/none.db"], "no results store"),
    ("perturb-missing-folder", [*PERTURB, "--images", "{root}/nowhere", "--out", "{root}/o1"], "does not exist"),
    ("perturb-empty-folder", [*PERTURB, "--images", "{root}/empty", "--out", "{root}/o2"], "no images"),
    ("perturb-out-inside-in", [*PERTURB, "--images", "{root}/grey", "--out", "{root}/grey/out"], "outside the input"),
    ("train-resume-nothing", [*TRAIN, "--out", "{root}/fresh.safetensors", "--resume"], "nothing to resume"),
    # names
    ("eval-unknown-attack", [*EVAL, "--attack", "nosuch", "--db", "{db}"], "unknown attack 'nosuch'"),
    ("eval-unknown-attack-param", [*EVAL, "--attack", "pgd:stepz=3", "--db", "{db}"], "stepz"),
    ("eval-unknown-defense", [*EVAL, "--defense", "nosuch", "--db", "{db}"], "unknown defense 'nosuch'"),
    ("eval-unknown-dataset", [*EVAL, "--data", "nosuch", "--db", "{db}"], "unknown data set 'nosuch'"),
    ("eval-unknown-split", [*EVAL, "--split", "validation", "--db", "{db}"], "validation"),
    ("eval-unknown-norm", [*EVAL, "--norm", "l7", "--db", "{db}"], "l7"),
    ("eval-unknown-zoo-model", [*EVAL, "--model", "zoo:nosuch", "--db", "{db}"], "nosuch"),
    ("eval-unknown-device", [*EVAL, "--device", "tpu", "--db", "{db}"], "unknown device 'tpu'"),
    ("train-unknown-model", [*TRAIN, "--model", "smallcnnn", "--out", "{root}/x.safetensors"], "unknown model 'smallcnnn'"),
    ("train-unknown-recipe", [*TRAIN, "--recipe", "nosuch", "--out", "{root}/x.safetensors"], "nosuch"),
    ("zoo-add-bad-name", ["zoo", "add", CKPT, "--name", "bad name!", "--zoo", "{root}/zoo"], "zoo names use"),
    ("list-unknown-kind", ["list", "widgets"], "invalid choice: 'widgets'"),
    ("unknown-command", ["evaluate"], "invalid choice: 'evaluate'"),
    # numbers
    ("eps-divides-by-zero", [*EVAL, "--eps", "8/0", "--db", "{db}"], "divides by zero"),
    ("eps-wider-than-box", [*EVAL, "--eps", "2", "--db", "{db}"], "wider than the [0, 1] pixel box"),
    ("eps-not-a-number", [*EVAL, "--eps", "abc", "--db", "{db}"], "abc"),
    ("eps-negative", [*EVAL, "--eps", "-0.1", "--db", "{db}"], "eps"),
    ("n-zero", [*EVAL, "--n", "0", "--db", "{db}"], "--n must be >= 1"),
    ("batch-size-zero", [*EVAL, "--batch-size", "0", "--db", "{db}"], "batch size"),
    ("attack-steps-zero", [*EVAL, "--attack", "pgd:steps=0", "--db", "{db}"], "steps must be >= 1"),
    ("steps-grid-fraction", [*EVAL, "--steps-grid", "0.5", "--db", "{db}"], "whole numbers"),
    ("train-epochs-zero", [*TRAIN, "--epochs", "0", "--out", "{root}/x.safetensors"], "epochs"),
    ("train-negative-lr", [*TRAIN, "--lr", "-1", "--out", "{root}/x.safetensors"], "learning rate"),
    ("train-negative-save-interval", [*TRAIN, "--save-every-minutes", "-1", "--out", "{root}/x.safetensors"],
     "--save-every-minutes must be >= 0"),
    # shapes, channels, sizes
    ("eval-rgb-model-grey-data", [*EVAL, "--model", "cifar_cnn", "--db", "{db}"], "3-channel (RGB)"),
    ("perturb-grey-model-rgb-images", [*PERTURB, "--images", "{root}/rgb", "--out", "{root}/o3"], "1-channel (grey)"),
    ("perturb-wrong-size", [*PERTURB, "--model", "lenet", "--images", "{root}/grey", "--out", "{root}/o4"], "1x8x8"),
    ("train-wrong-size", [*TRAIN, "--model", "smallcnn", "--out", "{root}/x.safetensors"], "built for 1-channel (grey) 28x28"),
    # corrupt files
    ("eval-corrupt-checkpoint", [*EVAL, "--model", "{root}/corrupt.safetensors", "--db", "{db}"], "corrupt.safetensors"),
    ("eval-corrupt-card", [*EVAL, "--model", "{root}/badcard.safetensors", "--db", "{db}"], "not valid JSON"),
    ("eval-corrupt-data-file", [*EVAL, "--data", "mnist", "--data-root", "{root}/data", "--db", "{db}"], "mnist_test.npz"),
    ("train-corrupt-state", [*TRAIN, "--checkpoint-dir", "{root}/state.train", "--resume", "--out", "{root}/x.safetensors"],
     "not valid JSON"),
]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("robustlab: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not [x for x in err.splitlines() if "error:" in x and not x.startswith("robustlab: error:")], err
    return lines[0]


def test_at_least_40_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case, argv, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, phrase, env, capsys, recwarn):
    before = _digest(env["db"])
    argv = [a.format(db=env["db"], root=env["root"]) for a in argv]
    assert _run(argv) == 2
    line = _error_line(capsys)
    assert phrase in line, line
    assert _digest(env["db"]) == before


def test_permissions(env, tmp_path, capsys):
    """Writing into a locked store, creating one in a locked folder, an unwritable --out, an older
    locked store: each one line, the store unchanged."""
    store = tmp_path / "locked" / "r.db"
    store.parent.mkdir()
    shutil.copyfile(env["db"], store)
    old = tmp_path / "old" / "old.db"
    old.parent.mkdir()
    shutil.copyfile(GOLDEN / "release_store.db", old)
    out = tmp_path / "out"
    out.mkdir()
    before = {p: _digest(p) for p in (store, old)}
    cases = [([*EVAL, "--db", str(store)], "cannot write the results store"),
             ([*EVAL, "--db", str(store.parent / "new.db")], "cannot create the results store"),
             (["report", "latest", "--db", str(store), "--out", str(out / "rep")], "permission denied"),
             (["report", "latest", "--db", str(old), "--out", str(tmp_path / "rep2")], "copy it"),
             ([*TRAIN, "--out", str(out / "m.safetensors")], "permission denied")]
    with unwritable(store, store.parent, old, old.parent, out):
        for argv, phrase in cases:
            assert _run(argv) == 2, argv
            assert phrase in _error_line(capsys), argv
    assert {p: _digest(p) for p in before} == before and sorted(os.listdir(store.parent)) == ["r.db"]


def test_ctrl_c_and_a_run_held_by_another_process(env, tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-run: 130 and one line; the store stays consistent (the run marked interrupted).
    Then a second process's live lease on that run: --resume refuses in one line, writes nothing."""
    from robustlab.eval.protocols.adversarial import AdversarialProtocol

    db = tmp_path / "r.db"
    shutil.copyfile(env["db"], db)
    real, calls = AdversarialProtocol.run_batch, [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdversarialProtocol, "run_batch", interrupted)
    argv = [*EVAL, "--n", "40", "--batch-size", "16", "--db", str(db)]
    assert _run(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("robustlab: interrupted;") and "--resume" in err[-1] and "Traceback" not in "".join(err)
    monkeypatch.undo()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    run_id, status = con.execute("SELECT run_id, status FROM runs ORDER BY created DESC, rowid DESC").fetchone()
    assert status == "interrupted" and con.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    batches = con.execute("SELECT COUNT(*) FROM batches WHERE run_id = ?", (run_id,)).fetchone()[0]
    assert batches == 1
    # pid 1 exists on this host: the lease is live.
    con.execute("INSERT INTO leases VALUES (?, 1, ?, '2026-01-01T00:00:00+00:00', datetime('now') || '+00:00', 'x')",
                (run_id, socket.gethostname()))
    con.commit()
    con.execute("UPDATE leases SET heartbeat = replace(heartbeat, ' ', 'T')")
    con.commit()
    assert _run([*argv, "--resume"]) == 2
    assert f"run {run_id}" in _error_line(capsys)
    assert con.execute("SELECT COUNT(*) FROM batches WHERE run_id = ?", (run_id,)).fetchone()[0] == batches
    con.close()
