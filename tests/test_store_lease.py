"""Two processes never work on the same run at once (issue 19 item 7): a lease in the store, renewed
after every batch. A second process refuses with one line naming the holder; a killed holder does
not block the run forever (its pid is gone on this host, or its heartbeat is stale elsewhere)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.eval.store import LEASE_STALE_SECONDS, ResultsStore

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]
EVAL = ["eval", "--model", str(GOLDEN / "digits_cnn.safetensors"), "--data", "digits", "--norm", "linf",
        "--eps", "0.1", "--attack", "pgd:steps=20", "--n", "64", "--no-sanity", "--steps-grid", "none", "--eps-grid", "",
        "--batch-size", "8", "--device", "cpu", "--resume"]


def _lease_row(db: Path):
    if not db.exists():
        return None
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT run_id, pid FROM leases").fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        con.close()


def _stop_outside_a_transaction(proc: subprocess.Popen, db: Path) -> None:
    """SIGSTOP the process at a moment it holds no write lock (so the store stays usable)."""
    for _ in range(200):
        proc.send_signal(signal.SIGSTOP)
        con = sqlite3.connect(str(db), timeout=0.05)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        finally:
            con.close()
    raise AssertionError("the first process never left its write transaction")


def _counts(db: Path) -> tuple[int, int]:
    con = sqlite3.connect(str(db))
    try:
        return tuple(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("batches", "adversarial_samples"))
    finally:
        con.close()


def test_a_second_process_refuses_and_takes_over_once_the_first_is_killed(tmp_path, capsys):
    db = tmp_path / "same.db"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.Popen([sys.executable, "-m", "robustlab", *EVAL, "--db", str(db)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240  # the first process imports torch and loads the model first (slow on a busy machine)
        while _lease_row(db) is None:
            assert first.poll() is None, "the first process ended before it held the run"
            assert time.time() < deadline
            time.sleep(0.02)
        run_id, pid = _lease_row(db)
        assert pid == first.pid
        _stop_outside_a_transaction(first, db)  # alive, holding the run, doing nothing
        before = _counts(db)
        assert main([*EVAL, "--db", str(db)]) == 2  # this process: the second one
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("robustlab: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"run {run_id}" in lines[0] and f"process {first.pid} on" in lines[0] and "since" in lines[0]
        assert _counts(db) == before  # nothing written by the refused process
    finally:
        first.kill()
        first.wait()
    # The holder is dead: its lease no longer counts; the run is resumed and finished once.
    assert main([*EVAL, "--db", str(db)]) == 0
    err = capsys.readouterr().err
    assert f"resuming run {run_id}" in err
    with ResultsStore(db, readonly=True) as store:
        run = store.get_run(run_id)
        assert run["status"] == "complete" and run["n"] == 64 and store.lease(run_id) is None
        assert len(store.samples(run_id)) == 64 and len(store.list_runs()) == 1


def test_a_stale_lease_of_another_host_is_taken_over(tmp_path):
    db = tmp_path / "r.db"
    with ResultsStore(db) as store:
        run_id = store.create_run("adversarial", {"model": "m", "dataset": "d", "split": "t", "n": 1, "seed": 0}, {}, {})
    old = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - LEASE_STALE_SECONDS - 5))
    recent = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 5))
    con = sqlite3.connect(str(db))
    con.execute("UPDATE leases SET host = 'elsewhere', pid = 1, token = 'x', heartbeat = ?", (recent,))
    con.commit()
    with ResultsStore(db) as store, pytest.raises(RobustlabError, match="process 1 on elsewhere"):
        store.acquire_lease(run_id)  # live elsewhere: refused
    con.execute("UPDATE leases SET heartbeat = ?", (old,))
    con.commit()
    con.close()
    with ResultsStore(db) as store:  # stale: taken over, and the heartbeat is ours now
        store.acquire_lease(run_id)
        assert store.lease(run_id)["pid"] == os.getpid()
        store.heartbeat(run_id)
        store.release_lease(run_id)
        assert store.lease(run_id) is None
