"""A results store written by the release before the evaluation core (schema 1, tests/golden/
release_store.db, made by tests/golden/make_golden.py) migrates, reports, ranks and resumes with the
same numbers; a store from a newer schema is refused and left untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))

from golden_spec import ATTACKS, N, OPTIONS, THREAT, record, same  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.data import load_dataset  # noqa: E402
from robustlab.errors import RobustlabError  # noqa: E402
from robustlab.eval import EvalOptions, ResultsStore, evaluate  # noqa: E402
from robustlab.eval.protocols import protocol_class  # noqa: E402
from robustlab.eval.store import SCHEMA_VERSION  # noqa: E402
from robustlab.models import load_model  # noqa: E402
from robustlab.report import leaderboard, write_report  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


@pytest.fixture
def old_store(tmp_path):
    path = tmp_path / "release.db"
    shutil.copy(GOLDEN / "release_store.db", path)
    return path


def _runs(path):
    con = sqlite3.connect(path)
    try:
        return {r[0]: r[1] for r in con.execute("SELECT model, run_id FROM runs")}
    finally:
        con.close()


def test_old_store_migrates_and_reports_the_same_numbers(old_store, tmp_path):
    golden = json.loads((GOLDEN / "record.json").read_text())
    ids = _runs(old_store)
    with ResultsStore(old_store) as store:
        version = store.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert int(version) == SCHEMA_VERSION == 2
        run = store.get_run(ids["digits_cnn_golden"])
        assert run["protocol"] == "adversarial" and run["status"] == "complete"
        # Per-sample rows and tasks survive the move to the protocol's table.
        assert record(store, run["run_id"], run["summary"], run["checks"])["tasks"] == golden["tasks"]
        # The one summary computation gives, from the migrated rows, the numbers the release stored.
        again = protocol_class("adversarial").summarize(store, run, [])
        for key in ("clean_accuracy", "steps_curve", "min_norm", "rejected", "n"):
            assert again[key] == run["summary"][key], key
        # (the headline is now the per-sample worst case over the whole run; the ensemble's is the release's)
        assert again["ensemble_robust_accuracy"] == run["summary"]["robust_accuracy"]
        assert [(a["broken"], a["robust_accuracy"]) for a in again["attacks"]] == [
            (a["broken"], a["robust_accuracy"]) for a in run["summary"]["attacks"]]
        paths = write_report(store, run["run_id"], tmp_path / "report")
        groups = leaderboard(store)
        # The interrupted run reports as partial from the rows it has.
        partial = write_report(store, ids["digits_cnn_interrupted"], tmp_path / "partial")
    doc = json.loads(paths["summary"].read_text())
    assert doc["summary"]["robust_accuracy"] == golden["summary"]["robust_accuracy"]
    page = paths["html"].read_text()
    assert f"{100 * golden['summary']['robust_accuracy']:.2f}%" in page
    assert [(g.dataset, g.title) for g in groups] == [("digits", "digits · L∞ ε = 0.1")]
    assert [r.run_id for r in groups[0].rows] == [ids["digits_cnn_golden"]]
    assert groups[0].rows[0].robust_accuracy == golden["summary"]["robust_accuracy"]
    assert "INCOMPLETE RUN" in partial["html"].read_text()


def test_interrupted_run_of_an_old_store_resumes_to_the_release_numbers(old_store):
    golden = json.loads((GOLDEN / "record.json").read_text())
    model = load_model(str(GOLDEN / "digits_cnn.safetensors")).model.eval()
    data = load_dataset("digits", "test").subset(N)
    threat = ThreatModel(*THREAT)
    attacks = [create_attack(name, threat, **params) for name, params in ATTACKS]
    ids = _runs(old_store)
    with ResultsStore(old_store) as store:
        done_before = store.done_batches(ids["digits_cnn_interrupted"], "main")
        assert done_before == {0}
        result = evaluate(model, data, attacks, store, model_name="digits_cnn_interrupted",
                          options=EvalOptions(**OPTIONS), resume=True)
        assert result.resumed and result.run_id == ids["digits_cnn_interrupted"]
        got = record(store, result.run_id, result.summary, result.checks)
    assert same(got["tasks"], golden["tasks"])
    assert result.summary["ensemble_robust_accuracy"] == golden["summary"]["robust_accuracy"]


def test_store_of_a_newer_schema_is_refused_and_left_untouched(old_store):
    with ResultsStore(old_store):
        pass
    con = sqlite3.connect(old_store)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    before = hashlib.sha256(old_store.read_bytes()).hexdigest()
    with pytest.raises(RobustlabError, match="newer robustlab"):
        ResultsStore(old_store)
    assert hashlib.sha256(old_store.read_bytes()).hexdigest() == before
