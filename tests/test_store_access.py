"""Read-only results stores (issue 19 items 3 and 4): commands that only read work on a store nobody
may write (shared results on a read-only mount) and leave it byte-identical; writing into one, or
creating one where the folder is not writable, says in one line that it is a permission problem; an
older store that cannot be written says to copy it; an unwritable --out is one line naming the path.

Unwritable means really unwritable for this process (see tests/unwritable.py: file modes, or the
immutable attribute when the tests run as root)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from unwritable import unwritable

from robustlab.cli import main

GOLDEN = Path(__file__).parent / "golden"
EVAL = ["eval", "--model", str(GOLDEN / "digits_cnn.safetensors"), "--data", "digits", "--norm", "linf",
        "--eps", "0.1", "--attack", "fgsm", "--no-sanity", "--steps-grid", "none", "--n", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def made_store(tmp_path_factory):
    db = tmp_path_factory.mktemp("made") / "r.db"
    assert main([*EVAL, "--db", str(db)]) == 0
    return db


@pytest.fixture
def shared(made_store, tmp_path):
    """A copy of the store in its own folder (the folder is what gets locked)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    shutil.copyfile(made_store, folder / "r.db")
    return folder / "r.db"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("robustlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def test_report_leaderboard_and_zoo_read_a_locked_store(shared, tmp_path, capsys):
    before = _digest(shared)
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(GOLDEN / f"digits_cnn{suffix}", tmp_path / f"m{suffix}")
    with unwritable(shared, shared.parent):
        assert main(["report", "latest", "--db", str(shared), "--out", str(tmp_path / "rep")]) == 0
        assert main(["leaderboard", "--db", str(shared), "--out", str(tmp_path / "lb.html")]) == 0
        assert main(["zoo", "add", str(tmp_path / "m.safetensors"), "--name", "m", "--zoo", str(tmp_path / "zoo"),
                     "--run", "latest", "--db", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "fgsm" in out
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "lb.html").is_file()
    assert _digest(shared) == before and sorted(p.name for p in shared.parent.iterdir()) == ["r.db"]


def test_a_locked_file_in_a_writable_folder_is_read_with_mode_ro(shared, tmp_path, capsys):
    before = _digest(shared)
    with unwritable(shared):
        assert main(["report", "latest", "--db", str(shared), "--out", str(tmp_path / "rep")]) == 0
    assert _digest(shared) == before


def test_writing_into_a_locked_store_is_a_permission_problem(shared, capsys):
    before = _digest(shared)
    with unwritable(shared, shared.parent):
        assert main([*EVAL, "--db", str(shared)]) == 2
    line = _error(capsys)
    assert f"cannot write the results store {shared}: permission denied" in line
    assert _digest(shared) == before


def test_a_new_store_in_a_locked_folder_is_a_permission_problem(tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    with unwritable(folder):
        assert main([*EVAL, "--db", str(folder / "new.db")]) == 2
    line = _error(capsys)
    assert "cannot create the results store" in line and "permission denied" in line
    assert "is not a robustlab results store" not in line and not list(folder.iterdir())


def test_an_older_locked_store_says_to_copy_it(tmp_path, capsys):
    old = tmp_path / "old.db"
    shutil.copyfile(GOLDEN / "release_store.db", old)  # schema 1
    before = _digest(old)
    with unwritable(old, tmp_path):
        assert main(["report", "latest", "--db", str(old), "--out", str(tmp_path.parent / f"{tmp_path.name}-r")]) == 2
    line = _error(capsys)
    assert "older robustlab (schema 1" in line and "copy it" in line
    assert _digest(old) == before


def test_an_older_writable_store_is_still_migrated_by_report(tmp_path, capsys):
    old = tmp_path / "old.db"
    shutil.copyfile(GOLDEN / "release_store.db", old)
    assert main(["report", "latest", "--db", str(old), "--out", str(tmp_path / "rep")]) == 0


def test_an_unwritable_report_folder_is_one_line(shared, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable(locked):
        assert main(["report", "latest", "--db", str(shared), "--out", str(locked / "rep")]) == 2
    line = _error(capsys)
    assert str(locked / "rep") in line and "permission denied" in line
