"""The results store: one SQLite file holding runs, their attack configs, environment, per-sample
outcomes, and a few adversarial examples for the report gallery.

Every run belongs to a protocol (adversarial, certified, corruption, zero-shot) whose configuration
is the run's ``config``; per-sample outcomes go to that protocol's own table. A run is split into
tasks (the main evaluation, each point of an epsilon or steps curve, each sanity check) and each task
into batches. A batch's per-sample rows and its "done" mark are written in one transaction, so a run
killed at any moment resumes from the batches that are done, with no sample lost or counted twice. A
batch that runs long also keeps its state between two of its steps (``partial_batches``: opaque bytes
of the protocol's, e.g. ``robustlab.attacks.ensemble.EnsembleState``) until its rows replace it. A
protocol may keep bytes with a whole run (``run_files``: e.g. a universal perturbation fitted once).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import astuple, dataclass, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from robustlab.errors import RobustlabError

SCHEMA_VERSION = 2
LEASE_STALE_SECONDS = 600.0  # a lease without a heartbeat for this long is taken over

# Generic tables: every protocol's runs, tasks and batches (no ';' inside a comment: the migration splits
# this text on them). Per-sample outcomes live in one table per
# protocol (``<protocol>_samples``, declared by the protocol, see ``ensure_sample_table``); the
# adversarial protocol's is created here so that stores of schema 1 migrate into it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    finished TEXT,
    status TEXT NOT NULL,                -- running | interrupted | complete | failed
    protocol TEXT NOT NULL,              -- adversarial | certified | corruption | zero-shot ...
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,                -- JSON: everything that determines the numbers (the protocol's too)
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    environment TEXT NOT NULL,           -- JSON: versions, device, threads
    model_info TEXT NOT NULL,            -- JSON: card, source, defenses, modes found, randomized
    checks TEXT,                         -- JSON list of sanity-check verdicts
    summary TEXT                         -- JSON summary written at the end
);
CREATE INDEX IF NOT EXISTS runs_by_hash ON runs (protocol, config_hash, status);
CREATE TABLE IF NOT EXISTS attacks (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    attack_index INTEGER NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,                -- JSON
    targeted INTEGER NOT NULL,
    minimum_norm INTEGER,                -- may return points beyond eps (NULL: not recorded, schema 1)
    PRIMARY KEY (run_id, attack_index)
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    task TEXT NOT NULL,                  -- e.g. main, eps=0.1, steps=20, sanity:large-eps
    kind TEXT NOT NULL,                  -- the protocol's: main | eps | steps | sanity ...
    n INTEGER NOT NULL,
    params TEXT NOT NULL,                -- JSON: what the task varies (adversarial: eps, steps)
    PRIMARY KEY (run_id, task)
);
CREATE TABLE IF NOT EXISTS batches (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    costs TEXT NOT NULL,                 -- JSON list, per step of the batch (attack): {seconds, gradients, forwards}
    rejected INTEGER NOT NULL,           -- claims that failed re-verification
    finished TEXT NOT NULL,
    PRIMARY KEY (run_id, task, batch_index)
);
CREATE TABLE IF NOT EXISTS partial_batches (
    run_id TEXT NOT NULL,
    task TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    state BLOB NOT NULL,                 -- a batch between two of its steps (the protocol's bytes)
    saved TEXT NOT NULL,
    PRIMARY KEY (run_id, task, batch_index)
);
CREATE TABLE IF NOT EXISTS run_files (    -- bytes a protocol keeps with a run, e.g. a fitted universal perturbation
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    saved TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS adversarial_samples (
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
CREATE TABLE IF NOT EXISTS leases (    -- which process works on a run now (one at a time)
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started TEXT NOT NULL,
    heartbeat TEXT NOT NULL,             -- renewed after every batch, stale after LEASE_STALE_SECONDS
    token TEXT NOT NULL                  -- the holder's ResultsStore object
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

# Schema 1 (robustlab up to b9ac979) -> 2: runs and tasks lose the adversarial columns (norm, eps,
# clean_accuracy, robust_accuracy: the config and summary hold them) and gain the protocol; per-sample
# rows move to the adversarial protocol's table. One transaction: a failure leaves schema 1 as it was.
_MIGRATE_1_TO_2 = [
    "ALTER TABLE runs RENAME TO runs_v1",
    "ALTER TABLE tasks RENAME TO tasks_v1",
    "DROP INDEX IF EXISTS runs_by_hash",
    "ALTER TABLE samples RENAME TO adversarial_samples",
    "ALTER TABLE attacks ADD COLUMN minimum_norm INTEGER",
    "__SCHEMA__",
    "INSERT INTO runs SELECT run_id, created, finished, status, 'adversarial', config_hash, config, model, dataset,"
    " split, n, seed, environment, model_info, checks, summary FROM runs_v1 ORDER BY rowid",
    "INSERT INTO tasks SELECT run_id, task, kind, n, json_object('eps', eps, 'steps', steps) FROM tasks_v1 ORDER BY rowid",
    "DROP TABLE runs_v1",
    "DROP TABLE tasks_v1",
    "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
]


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
    """A SQLite results store. Use as a context manager or call ``close()``.

    ``readonly``: True opens the file read-only (SQLite's ``mode=ro``; ``immutable=1`` as well when
    there is no journal beside it and its folder is not writable, e.g. shared results on a read-only
    mount), for commands that only read (report, zoo add --run); False opens it for writing (eval) and
    says in one line when the file or its folder cannot be written; None (the default) writes where it
    can and reads only where it cannot. Opening a store written by an older robustlab migrates it in
    place (one transaction) when it can be written; a store written by a newer one is refused before
    anything is written to it.
    """

    def __init__(self, path: str | Path, readonly: bool | None = None) -> None:
        self.path = Path(path)
        self.created = False  # this object created the file (see discard_if_unused)
        self._token = uuid.uuid4().hex  # identifies this object's leases
        if self.path.exists() and self.path.is_dir():
            raise RobustlabError(f"results store {self.path} is a directory; give a file path such as runs.db")
        if readonly is None:
            readonly = self.path.is_file() and _write_problem(self.path) is not None
        self.readonly = readonly
        if readonly:
            self._open_readonly()
            return
        problem = _write_problem(self.path)
        if problem is not None:
            raise RobustlabError(problem)
        self.created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise RobustlabError(f"{self.path} is not a robustlab results store (SQLite said: {exc})") from None
        version = self._check_tables(tables)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            if version is not None and version < SCHEMA_VERSION:
                self._migrate(version)
            self.db.executescript(_SCHEMA)
            if version is None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.OperationalError as exc:
            self.db.close()
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise RobustlabError(f"cannot write the results store {self.path}: permission denied "
                                     f"(SQLite said: {exc})") from None
            raise

    def _open_readonly(self) -> None:
        """Connect with ``mode=ro`` (plus ``immutable=1`` where nothing can be writing it: no journal
        beside it and its folder not writable); the schema must be this one (migrating needs writing)."""
        if not self.path.is_file():
            raise RobustlabError(f"no results store at {self.path}")
        journal = any(Path(f"{self.path}{s}").exists() for s in ("-wal", "-journal"))
        folder_writable = os.access(self.path.parent, os.W_OK | os.X_OK)
        uri = self.path.resolve().as_uri()
        tries = ["mode=ro"] if folder_writable or journal else []
        if not journal:
            tries.append("mode=ro&immutable=1")
        last: Exception | None = None
        for query in tries:
            try:
                self.db = sqlite3.connect(f"{uri}?{query}", uri=True, isolation_level=None, timeout=30)
                self.db.row_factory = sqlite3.Row
                tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                break
            except sqlite3.DatabaseError as exc:
                last = exc
        else:
            if isinstance(last, sqlite3.OperationalError) and not os.access(self.path, os.R_OK):
                raise RobustlabError(f"cannot read the results store {self.path}: permission denied") from None
            raise RobustlabError(f"{self.path} is not a robustlab results store (SQLite said: {last})") from None
        version = self._check_tables(tables)
        if version is not None and version < SCHEMA_VERSION:
            self.db.close()
            if _write_problem(self.path) is None:  # it can be written: migrate it, then read
                self.__init__(self.path, readonly=False)
                return
            raise RobustlabError(f"{self.path} was written by an older robustlab (schema {version}; this one reads "
                                 f"{SCHEMA_VERSION}) and cannot be written here, so it cannot be migrated: copy it "
                                 f"to a folder you can write (cp {self.path} results.db) and use the copy")

    def _check_tables(self, tables: set[str]) -> int | None:
        """The store's schema version after refusing what is no robustlab store or is newer than this."""
        if tables and "runs" not in tables:
            self.db.close()
            raise RobustlabError(f"{self.path} is an SQLite file but not a robustlab results store")
        version = self._schema_version(tables)
        if version is not None and version > SCHEMA_VERSION:
            self.db.close()
            raise RobustlabError(f"{self.path} was written by a newer robustlab (schema {version}; this one reads up "
                                 f"to {SCHEMA_VERSION}); upgrade robustlab. The file was not changed.")
        return version

    def _require_writable(self) -> None:
        if self.readonly:
            raise RobustlabError(_write_problem(self.path) or f"cannot write the results store {self.path}: it was "
                                 "opened read-only")

    def discard_if_unused(self) -> None:
        """Close, and delete the file (with its WAL files) if this object created it and it holds no
        run: a command that failed before its first run leaves no empty store behind."""
        empty = self.created and self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
        self.close()
        if empty:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _schema_version(self, tables: set[str]) -> int | None:
        """The schema a store was written with (None: a new, empty file)."""
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None:
                return int(row[0])
        return 1 if "runs" in tables else None

    def _migrate(self, version: int) -> None:
        """Bring a store of an older schema to this one, in one transaction."""
        self.db.execute("PRAGMA legacy_alter_table = ON")  # renames leave other tables' references alone
        try:
            with self._transaction():
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', '1')")
                columns = {r[1] for r in self.db.execute("PRAGMA table_info(samples)")}
                if "min_distance" not in columns:  # written before minimum-norm attacks existed
                    self.db.execute("ALTER TABLE samples ADD COLUMN min_distance REAL")
                for statement in _MIGRATE_1_TO_2:
                    if statement == "__SCHEMA__":
                        for create in filter(None, (c.strip() for c in _SCHEMA.split(";"))):
                            self.db.execute(create)
                    else:
                        self.db.execute(statement)
        except sqlite3.DatabaseError as exc:
            raise RobustlabError(f"{self.path}: could not migrate the results store from schema {version} to "
                                 f"{SCHEMA_VERSION} (SQLite said: {exc}); the file was left as it was") from None
        finally:
            self.db.execute("PRAGMA legacy_alter_table = OFF")

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
        protocol: str,
        config: dict[str, Any],
        environment: dict[str, Any],
        model_info: dict[str, Any],
        attacks: list[dict[str, Any]] = (),
    ) -> str:
        """Register a new run of ``protocol``; returns its id. ``config`` needs model, dataset, split, n
        and seed, plus whatever the protocol adds.

        ``attacks``: one dict per attack (name, params, targeted, minimum_norm), in the order they run.
        """
        self._require_writable()
        run_id = uuid.uuid4().hex[:12]
        with self._transaction():
            self.db.execute(
                "INSERT INTO runs (run_id, created, status, protocol, config_hash, config, model, dataset, split, n,"
                " seed, environment, model_info) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, _now(), protocol, config_hash(config), json.dumps(config, sort_keys=True),
                    str(config["model"]), config["dataset"], config["split"], int(config["n"]), int(config["seed"]),
                    json.dumps(environment), json.dumps(model_info, default=str),
                ),
            )
            self._take_lease(run_id)
            for i, attack in enumerate(attacks):
                self.db.execute(
                    "INSERT INTO attacks VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, i, attack["name"], json.dumps(attack["params"]), int(bool(attack.get("targeted"))),
                     None if attack.get("minimum_norm") is None else int(bool(attack["minimum_norm"]))),
                )
        return run_id

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, run_id: str) -> None:
        """Make this process the only one working on ``run_id`` (``create_run`` does it for a new run).
        Refused, in one line saying who holds it and since when, while another process's lease is
        live; a lease whose process is gone (same host) or that had no heartbeat for
        :data:`LEASE_STALE_SECONDS` (any host) is taken over."""
        self._require_writable()
        with self._transaction():
            row = self.db.execute("SELECT * FROM leases WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None and row["token"] != self._token and _lease_live(row):
                age = _seconds_since(row["heartbeat"])
                raise RobustlabError(
                    f"run {run_id} in {self.path} is being worked on by process {row['pid']} on {row['host']} since "
                    f"{row['started']} (last heartbeat {age:.0f} s ago); two processes never work on one run: wait "
                    f"for it to end, or stop it (its lease lapses when it dies, or after "
                    f"{LEASE_STALE_SECONDS / 60:.0f} minutes without a heartbeat)")
            self._take_lease(run_id)

    def _take_lease(self, run_id: str) -> None:
        now = _now()
        self.db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, os.getpid(), socket.gethostname(), now, now, self._token))

    def heartbeat(self, run_id: str) -> None:
        """Renew this process's lease on ``run_id``; a lease taken over meanwhile (this process was
        silent past :data:`LEASE_STALE_SECONDS`) stops it with one line."""
        cur = self.db.execute("UPDATE leases SET heartbeat = ? WHERE run_id = ? AND token = ?",
                              (_now(), run_id, self._token))
        if cur.rowcount == 0:
            raise RobustlabError(f"run {run_id} in {self.path} was taken over by another process while this one was "
                                 f"silent for more than {LEASE_STALE_SECONDS / 60:.0f} minutes; stopping")

    def release_lease(self, run_id: str) -> None:
        """Give up this process's lease on ``run_id`` (nothing if it holds none)."""
        if not self.readonly:
            self.db.execute("DELETE FROM leases WHERE run_id = ? AND token = ?", (run_id, self._token))

    def lease(self, run_id: str) -> dict[str, Any] | None:
        """The lease on ``run_id`` (pid, host, started, heartbeat), or None."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'leases'").fetchone():
            return None
        row = self.db.execute("SELECT pid, host, started, heartbeat FROM leases WHERE run_id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def find_resumable(self, protocol: str, config: dict[str, Any],
                       normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                       complete: bool = False) -> str | None:
        """The newest unfinished (with ``complete``: finished) run of ``protocol`` with exactly this
        configuration, if any. ``normalize`` brings a stored configuration up to date (parameters
        added to a component since, with the defaults that keep its old behaviour) before comparing."""
        wanted = config_hash(config)
        rows = self.db.execute(
            f"SELECT run_id, config_hash, config FROM runs WHERE protocol = ? AND status {'=' if complete else '!='}"
            " 'complete' ORDER BY created DESC, rowid DESC", (protocol,)).fetchall()
        for run_id, stored_hash, stored in rows:
            if stored_hash == wanted or (normalize is not None and config_hash(normalize(json.loads(stored))) == wanted):
                return run_id
        return None

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
        """One run as a dict, JSON columns parsed, with its ``attacks`` list and ``tasks`` (each task's
        params merged into it)."""
        run_id = self.resolve_run(run)
        row = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        out = _run_dict(row)
        out["attacks"] = [
            {"index": r["attack_index"], "name": r["name"], "params": json.loads(r["params"]), "targeted": bool(r["targeted"]),
             "minimum_norm": None if r["minimum_norm"] is None else bool(r["minimum_norm"])}
            for r in self.db.execute("SELECT * FROM attacks WHERE run_id = ? ORDER BY attack_index", (run_id,))
        ]
        out["tasks"] = self.tasks(run_id)
        return out

    def tasks(self, run_id: str) -> list[dict[str, Any]]:
        """The tasks of a run in the order they were declared: task, kind, n and the task's params."""
        return [{"task": r["task"], "kind": r["kind"], "n": r["n"], **json.loads(r["params"])}
                for r in self.db.execute("SELECT * FROM tasks WHERE run_id = ? ORDER BY rowid", (run_id,))]

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, JSON columns parsed."""
        return [_run_dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY created, rowid")]

    def finish_run(self, run_id: str, summary: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        """Mark a run complete with its summary and sanity-check verdicts."""
        self._require_writable()
        with self._transaction():
            self.db.execute(
                "UPDATE runs SET status = 'complete', finished = ?, summary = ?, checks = ? WHERE run_id = ?",
                (_now(), json.dumps(summary), json.dumps(checks), run_id),
            )

    def set_status(self, run_id: str, status: str) -> None:
        self._require_writable()
        self.db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))

    # ------------------------------------------------------------------ tasks and batches

    def add_task(self, run_id: str, task: str, kind: str, n: int, params: dict[str, Any]) -> None:
        """Declare a task of a run (idempotent: a resumed run declares its tasks again)."""
        self._require_writable()
        self.db.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?, ?, ?)",
                        (run_id, task, kind, int(n), json.dumps(params, sort_keys=True)))

    def done_batches(self, run_id: str, task: str) -> set[int]:
        rows = self.db.execute("SELECT batch_index FROM batches WHERE run_id = ? AND task = ?", (run_id, task))
        return {r[0] for r in rows}

    def save_partial(self, run_id: str, task: str, batch_index: int, state: bytes) -> None:
        """Keep the state of a batch between two of its steps (replacing any saved before)."""
        self._require_writable()
        self.db.execute("INSERT OR REPLACE INTO partial_batches VALUES (?, ?, ?, ?, ?)",
                        (run_id, task, int(batch_index), state, _now()))

    def load_partial(self, run_id: str, task: str, batch_index: int) -> bytes | None:
        """The state saved for an unfinished batch, if any."""
        row = self.db.execute("SELECT state FROM partial_batches WHERE run_id = ? AND task = ? AND batch_index = ?",
                              (run_id, task, int(batch_index))).fetchone()
        return row[0] if row else None

    def save_file(self, run_id: str, name: str, data: bytes) -> None:
        """Keep ``data`` with the run under ``name`` (a protocol's fitted state, e.g. a universal
        perturbation fitted once per run, so a resumed run reuses it)."""
        self._require_writable()
        self.db.execute("INSERT OR REPLACE INTO run_files VALUES (?, ?, ?, ?)", (run_id, name, data, _now()))

    def load_file(self, run_id: str, name: str) -> bytes | None:
        """What :meth:`save_file` kept for the run under ``name``, if anything."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'run_files'").fetchone():
            return None  # a store written before the table existed, opened read-only
        row = self.db.execute("SELECT data FROM run_files WHERE run_id = ? AND name = ?", (run_id, name)).fetchone()
        return row[0] if row else None

    def ensure_sample_table(self, table: str, columns: Sequence[tuple[str, str]]) -> None:
        """Create a protocol's per-sample table if missing: (run_id, task, sample_index) and ``columns``
        (name, SQL type) after them."""
        self._require_writable()
        if not table.replace("_", "").isalnum():
            raise ValueError(f"bad table name {table!r}")
        cols = "".join(f", {name} {sql}" for name, sql in columns)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (run_id TEXT NOT NULL, task TEXT NOT NULL, "
                        f"sample_index INTEGER NOT NULL{cols}, PRIMARY KEY (run_id, task, sample_index))")

    def write_batch(
        self,
        run_id: str,
        task: str,
        batch_index: int,
        rows: Iterable[Any],
        costs: list[dict[str, float]],
        rejected: int = 0,
        examples: Iterable[Example] = (),
        table: str = "adversarial_samples",
    ) -> None:
        """Write one finished batch atomically: its per-sample rows into the protocol's ``table`` (each
        row a dataclass or tuple in the table's column order, sample_index first), its examples and the
        done mark (and drop its saved partial state)."""
        self._require_writable()
        values = [(run_id, task, *(astuple(r) if is_dataclass(r) else tuple(r))) for r in rows]
        with self._transaction():
            self.db.execute("DELETE FROM partial_batches WHERE run_id = ? AND task = ? AND batch_index = ?",
                            (run_id, task, int(batch_index)))
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, task, int(batch_index), json.dumps(costs), int(rejected), _now()),
            )
            if values:
                marks = ", ".join("?" * len(values[0]))
                self.db.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
            self.db.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, task, e.sample_index, e.label, e.adv_pred, _npy(e.clean), _npy(e.adv)) for e in examples],
            )

    def count_examples(self, run_id: str, task: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM examples WHERE run_id = ? AND task = ?", (run_id, task)
        ).fetchone()[0]

    # ------------------------------------------------------------------ reading results

    def sample_rows(self, table: str, run_id: str, task: str = "main") -> list[sqlite3.Row]:
        """A protocol's per-sample rows of one task, by sample index (columns by name)."""
        return self.db.execute(f"SELECT * FROM {table} WHERE run_id = ? AND task = ? ORDER BY sample_index",
                               (run_id, task)).fetchall()

    def samples(self, run_id: str, task: str = "main") -> list[SampleRow]:
        """The adversarial protocol's per-sample outcomes of one task, by sample index."""
        names = [f.name for f in fields(SampleRow)]
        return [SampleRow(*(r[k] for k in names)) for r in self.sample_rows("adversarial_samples", run_id, task)]

    def batch_stats(self, run_id: str) -> dict[str, dict[str, int]]:
        """Per task: batches done and claims rejected by verification."""
        return {r[0]: {"batches": r[1], "rejected": r[2]} for r in self.db.execute(
            "SELECT task, COUNT(*), COALESCE(SUM(rejected), 0) FROM batches WHERE run_id = ? GROUP BY task", (run_id,))}

    def batch_seconds(self, run_id: str) -> list[tuple[str, int, float]]:
        """Every done batch of a run: (task, batch index, seconds it took, all its steps together)."""
        return [(task, b, sum(float(c.get("seconds", 0.0)) for c in json.loads(costs)))
                for task, b, costs in self.db.execute(
                    "SELECT task, batch_index, costs FROM batches WHERE run_id = ?", (run_id,))]

    def attack_costs(self, run_id: str, task: str = "main") -> list[dict[str, float]]:
        """Per attack (step) of a task: seconds, gradients and forwards, summed over its batches."""
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


def _seconds_since(stamp: str) -> float:
    return time.time() - datetime.fromisoformat(stamp).timestamp()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lease_live(row: sqlite3.Row) -> bool:
    """A lease counts while its heartbeat is recent and (on this host) its process exists."""
    if _seconds_since(row["heartbeat"]) > LEASE_STALE_SECONDS:
        return False
    return row["host"] != socket.gethostname() or _pid_alive(int(row["pid"]))


def _write_problem(path: Path) -> str | None:
    """Why the store at ``path`` cannot be written (or created), as one sentence; None if it can.
    (os.access answers for this process: a read-only mount or an immutable file stops root too.)"""
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create the results store {path}: {existing} is not a folder"
    if not path.exists():
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot create the results store {path}: permission denied (the folder {existing} is not writable)"
        return None
    if not os.access(path, os.R_OK):
        return f"cannot read the results store {path}: permission denied"
    if not os.access(path, os.W_OK):
        return (f"cannot write the results store {path}: permission denied (the file is read-only; report and "
                "leaderboard can still read it)")
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"cannot write the results store {path}: permission denied (its folder {folder} is not writable, "
                "and SQLite writes a journal beside the file)")
    return None
