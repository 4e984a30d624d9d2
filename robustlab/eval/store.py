"""The results store: one SQLite file holding runs, their attack configs, environment, per-sample
outcomes, and a few adversarial examples for the report gallery.

A run is split into tasks (the main evaluation, each point of an epsilon or steps curve, each sanity
check) and each task into batches. A batch's per-sample rows and its "done" mark are written in one
transaction, so a run killed at any moment resumes from the batches that are done, with no sample lost
or counted twice. A batch whose ensemble runs long also keeps its state between two attacks
(``partial_batches``, see ``robustlab.eval.partial``) until its rows replace it.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from robustlab.errors import RobustlabError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    finished TEXT,
    status TEXT NOT NULL,                -- running | complete | failed
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,                -- JSON: everything that determines the numbers
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    seed INTEGER NOT NULL,
    environment TEXT NOT NULL,           -- JSON: versions, device, threads
    model_info TEXT NOT NULL,            -- JSON: card, source, modes found, randomized
    checks TEXT,                         -- JSON list of sanity-check verdicts
    summary TEXT,                        -- JSON summary written at the end
    clean_accuracy REAL,
    robust_accuracy REAL
);
CREATE INDEX IF NOT EXISTS runs_by_hash ON runs (config_hash, status);
CREATE TABLE IF NOT EXISTS attacks (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    attack_index INTEGER NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,                -- JSON
    targeted INTEGER NOT NULL,
    PRIMARY KEY (run_id, attack_index)
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    task TEXT NOT NULL,                  -- e.g. main, eps=0.1, steps=20, sanity:large-eps
    kind TEXT NOT NULL,                  -- main | eps | steps | sanity
    eps REAL NOT NULL,
    steps INTEGER,
    n INTEGER NOT NULL,
    PRIMARY KEY (run_id, task)
);
CREATE TABLE IF NOT EXISTS batches (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    costs TEXT NOT NULL,                 -- JSON list, per attack: {seconds, gradients, forwards}
    rejected INTEGER NOT NULL,           -- successes claimed by an attack that failed re-verification
    finished TEXT NOT NULL,
    PRIMARY KEY (run_id, task, batch_index)
);
CREATE TABLE IF NOT EXISTS partial_batches (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    state BLOB NOT NULL,                 -- a batch between two attacks (robustlab.eval.partial), .npz bytes
    saved TEXT NOT NULL,
    PRIMARY KEY (run_id, task, batch_index)
);
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,
    robust INTEGER NOT NULL,
    broken_by INTEGER,                   -- index of the first attack that broke it (verified)
    adv_pred INTEGER,
    distance REAL,                       -- norm of the verified adversarial perturbation
    gradients INTEGER NOT NULL,          -- input gradients spent on this sample
    forwards INTEGER NOT NULL,           -- forward passes spent on this sample
    min_distance REAL,                   -- smallest verified misclassifying perturbation found, any norm
    PRIMARY KEY (run_id, task, sample_index)
);
CREATE TABLE IF NOT EXISTS examples (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    label INTEGER NOT NULL,
    adv_pred INTEGER NOT NULL,
    clean BLOB NOT NULL,                 -- .npy bytes, float16 (C, H, W)
    adv BLOB NOT NULL,
    PRIMARY KEY (run_id, task, sample_index)
);
"""


@dataclass
class SampleRow:
    """The outcome for one sample in one task."""

    sample_index: int
    label: int
    clean_pred: int
    clean_correct: bool
    robust: bool
    broken_by: int | None
    adv_pred: int | None
    distance: float | None
    gradients: int
    forwards: int
    min_distance: float | None = None


@dataclass
class Example:
    """A clean / adversarial pair kept for the report gallery."""

    sample_index: int
    label: int
    adv_pred: int
    clean: np.ndarray
    adv: np.ndarray


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a JSON-serializable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def _from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False).astype(np.float32)


class ResultsStore:
    """A SQLite results store. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise RobustlabError(f"results store {self.path} is a directory; give a file path such as runs.db")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise RobustlabError(f"{self.path} is not a robustlab results store (SQLite said: {exc})") from None
        if tables and "runs" not in tables:
            self.db.close()
            raise RobustlabError(f"{self.path} is an SQLite file but not a robustlab results store")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(samples)")}
        if "min_distance" not in columns:  # stores written before minimum-norm attacks existed
            self.db.execute("ALTER TABLE samples ADD COLUMN min_distance REAL")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RobustlabError(f"{self.path} was written by a newer robustlab (schema {row[0]}); upgrade robustlab")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> "_Tx":
        return _Tx(self.db)

    # ------------------------------------------------------------------ runs

    def create_run(
        self,
        config: dict[str, Any],
        environment: dict[str, Any],
        model_info: dict[str, Any],
        attacks: list[dict[str, Any]],
    ) -> str:
        """Register a new run; returns its id. ``config`` needs model, dataset, split, n, norm, eps, seed.

        ``attacks``: one dict per attack (name, params, targeted), in the order they run.
        """
        run_id = uuid.uuid4().hex[:12]
        with self._transaction():
            self.db.execute(
                "INSERT INTO runs (run_id, created, status, config_hash, config, model, dataset, split, n, norm, eps,"
                " seed, environment, model_info) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, _now(), config_hash(config), json.dumps(config, sort_keys=True), str(config["model"]),
                    config["dataset"], config["split"], int(config["n"]), config["norm"], float(config["eps"]),
                    int(config["seed"]), json.dumps(environment), json.dumps(model_info, default=str),
                ),
            )
            for i, attack in enumerate(attacks):
                self.db.execute(
                    "INSERT INTO attacks VALUES (?, ?, ?, ?, ?)",
                    (run_id, i, attack["name"], json.dumps(attack["params"]), int(bool(attack.get("targeted")))),
                )
        return run_id

    def find_resumable(self, config: dict[str, Any]) -> str | None:
        """The newest unfinished run with exactly this configuration, if any."""
        row = self.db.execute(
            "SELECT run_id FROM runs WHERE config_hash = ? AND status != 'complete' ORDER BY created DESC, rowid DESC",
            (config_hash(config),),
        ).fetchone()
        return row[0] if row else None

    def resolve_run(self, run: str) -> str:
        """A run id from a full id, a unique prefix, or ``latest``."""
        if run == "latest":
            row = self.db.execute("SELECT run_id FROM runs ORDER BY created DESC, rowid DESC").fetchone()
            if row is None:
                raise RobustlabError(f"the results store {self.path} has no runs yet")
            return row[0]
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (run + "%",)).fetchall()
        if not rows:
            raise RobustlabError(f"no run {run!r} in {self.path}; `robustlab leaderboard --db {self.path}` lists them")
        if len(rows) > 1:
            raise RobustlabError(f"run prefix {run!r} is ambiguous in {self.path}: {', '.join(r[0] for r in rows)}")
        return rows[0][0]

    def get_run(self, run: str) -> dict[str, Any]:
        """One run as a dict, JSON columns parsed, with its ``attacks`` list and ``tasks``."""
        run_id = self.resolve_run(run)
        row = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        out = _run_dict(row)
        out["attacks"] = [
            {"index": r["attack_index"], "name": r["name"], "params": json.loads(r["params"]), "targeted": bool(r["targeted"])}
            for r in self.db.execute("SELECT * FROM attacks WHERE run_id = ? ORDER BY attack_index", (run_id,))
        ]
        out["tasks"] = [dict(r) for r in self.db.execute("SELECT * FROM tasks WHERE run_id = ? ORDER BY rowid", (run_id,))]
        return out

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, JSON columns parsed."""
        return [_run_dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY created, rowid")]

    def finish_run(self, run_id: str, summary: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        """Mark a run complete with its summary and sanity-check verdicts."""
        with self._transaction():
            self.db.execute(
                "UPDATE runs SET status = 'complete', finished = ?, summary = ?, checks = ?, clean_accuracy = ?,"
                " robust_accuracy = ? WHERE run_id = ?",
                (
                    _now(), json.dumps(summary), json.dumps(checks), summary.get("clean_accuracy"),
                    summary.get("robust_accuracy"), run_id,
                ),
            )

    def set_status(self, run_id: str, status: str) -> None:
        self.db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))

    def update_model_info(self, run_id: str, model_info: dict[str, Any]) -> None:
        self.db.execute("UPDATE runs SET model_info = ? WHERE run_id = ?", (json.dumps(model_info, default=str), run_id))

    # ------------------------------------------------------------------ tasks and batches

    def add_task(self, run_id: str, task: str, kind: str, eps: float, steps: int | None, n: int) -> None:
        """Declare a task of a run (idempotent: a resumed run declares its tasks again)."""
        self.db.execute(
            "INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?, ?, ?)", (run_id, task, kind, float(eps), steps, int(n))
        )

    def done_batches(self, run_id: str, task: str) -> set[int]:
        rows = self.db.execute("SELECT batch_index FROM batches WHERE run_id = ? AND task = ?", (run_id, task))
        return {r[0] for r in rows}

    def save_partial(self, run_id: str, task: str, batch_index: int, state: bytes) -> None:
        """Keep the state of a batch between two of its attacks (replacing any saved before)."""
        self.db.execute("INSERT OR REPLACE INTO partial_batches VALUES (?, ?, ?, ?, ?)",
                        (run_id, task, int(batch_index), state, _now()))

    def load_partial(self, run_id: str, task: str, batch_index: int) -> bytes | None:
        """The state saved for an unfinished batch, if any."""
        row = self.db.execute("SELECT state FROM partial_batches WHERE run_id = ? AND task = ? AND batch_index = ?",
                              (run_id, task, int(batch_index))).fetchone()
        return row[0] if row else None

    def write_batch(
        self,
        run_id: str,
        task: str,
        batch_index: int,
        rows: Iterable[SampleRow],
        costs: list[dict[str, float]],
        rejected: int = 0,
        examples: Iterable[Example] = (),
    ) -> None:
        """Write one finished batch atomically: its sample rows, examples and the done mark (and drop
        its saved partial state)."""
        with self._transaction():
            self.db.execute("DELETE FROM partial_batches WHERE run_id = ? AND task = ? AND batch_index = ?",
                            (run_id, task, int(batch_index)))
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, task, int(batch_index), json.dumps(costs), int(rejected), _now()),
            )
            self.db.executemany(
                "INSERT INTO samples (run_id, task, sample_index, label, clean_pred, clean_correct, robust, broken_by,"
                " adv_pred, distance, gradients, forwards, min_distance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id, task, r.sample_index, r.label, r.clean_pred, int(r.clean_correct), int(r.robust),
                        r.broken_by, r.adv_pred, r.distance, r.gradients, r.forwards, r.min_distance,
                    )
                    for r in rows
                ],
            )
            self.db.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, task, e.sample_index, e.label, e.adv_pred, _npy(e.clean), _npy(e.adv)) for e in examples],
            )

    def count_examples(self, run_id: str, task: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM examples WHERE run_id = ? AND task = ?", (run_id, task)
        ).fetchone()[0]

    # ------------------------------------------------------------------ reading results

    def samples(self, run_id: str, task: str = "main") -> list[SampleRow]:
        """Per-sample outcomes of one task, by sample index."""
        cur = self.db.execute(
            "SELECT sample_index, label, clean_pred, clean_correct, robust, broken_by, adv_pred, distance, gradients,"
            " forwards, min_distance FROM samples WHERE run_id = ? AND task = ? ORDER BY sample_index",
            (run_id, task),
        )
        return [
            SampleRow(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5], r[6], r[7], r[8], r[9], r[10])
            for r in cur.fetchall()
        ]

    def task_stats(self, run_id: str) -> list[dict[str, Any]]:
        """For each task: kind, eps, steps, samples done, clean and robust accuracy, rejected count."""
        out = []
        for t in self.db.execute("SELECT * FROM tasks WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall():
            done, clean, robust = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(clean_correct), 0), COALESCE(SUM(robust), 0) FROM samples"
                " WHERE run_id = ? AND task = ?",
                (run_id, t["task"]),
            ).fetchone()
            rejected = self.db.execute(
                "SELECT COALESCE(SUM(rejected), 0) FROM batches WHERE run_id = ? AND task = ?", (run_id, t["task"])
            ).fetchone()[0]
            out.append(
                {
                    **dict(t),
                    "done": done,
                    "clean_accuracy": clean / done if done else None,
                    "robust_accuracy": robust / done if done else None,
                    "rejected": rejected,
                }
            )
        return out

    def attack_costs(self, run_id: str, task: str = "main") -> list[dict[str, float]]:
        """Per attack of a task: seconds, gradients and forwards, summed over its batches."""
        total: list[dict[str, float]] = []
        for (blob,) in self.db.execute("SELECT costs FROM batches WHERE run_id = ? AND task = ?", (run_id, task)):
            for i, cost in enumerate(json.loads(blob)):
                if i == len(total):
                    total.append({"seconds": 0.0, "gradients": 0, "forwards": 0})
                for key, value in cost.items():
                    total[i][key] = total[i].get(key, 0) + value
        return total

    def examples(self, run_id: str, task: str = "main", limit: int = 16) -> list[Example]:
        cur = self.db.execute(
            "SELECT sample_index, label, adv_pred, clean, adv FROM examples WHERE run_id = ? AND task = ?"
            " ORDER BY sample_index LIMIT ?",
            (run_id, task, limit),
        )
        return [Example(r[0], r[1], r[2], _from_npy(r[3]), _from_npy(r[4])) for r in cur.fetchall()]


def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("config", "environment", "model_info", "checks", "summary"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (KeyboardInterrupt included)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def rows_as_dicts(rows: Iterable[SampleRow]) -> Iterator[dict[str, Any]]:
    for r in rows:
        yield asdict(r)
