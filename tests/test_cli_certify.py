"""``robustlab certify``: the JSON contract (certified accuracy per radius, ACR), the store, the
report of a certified run, clear errors and warnings, help on every option."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from robustlab.cli import build_parser, main
from robustlab.eval.store import ResultsStore

CERTIFY = ["certify", "--data", "digits", "--samples", "8", "--n", "80", "--n0", "10", "--alpha", "0.01",
           "--attack-n", "3", "--attack-steps", "3", "--attack-draws", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "digits_noise.safetensors"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--epochs", "6", "--batch-size", "64",
                 "--recipe", "noise:sigma=0.25", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_certify_json_contract_store_and_report(checkpoint, tmp_path, capsys):
    db = tmp_path / "c.db"
    assert main([*CERTIFY, "--model", str(checkpoint), "--sigma", "0.25", "--db", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "smoothing" and out["norm"] == "l2" and out["noise"]["params"] == {"sigma": 0.25}
    assert list(out["certified_accuracy"]) == ["0", "0.25", "0.5", "0.75", "1"]
    acc = list(out["certified_accuracy"].values())
    assert acc == sorted(acc, reverse=True) and acc[0] > 0.5  # the noise-trained model certifies most digits
    with ResultsStore(db) as store:
        rows = store.sample_rows("certified_samples", out["run_id"])
        assert len(rows) == 8
        acr = sum(r["radius"] for r in rows if r["correct"] and r["prediction"] != -1) / 8
        assert out["acr"] == pytest.approx(acr)
        assert sum(1 for r in rows if r["correct"] and r["radius"] is not None and r["radius"] >= 0.25) / 8 == \
            pytest.approx(out["certified_accuracy"]["0.25"])
    assert {c["name"] for c in out["checks"]} >= {"draws", "certificates"}
    assert out["settings"] == {"n0": 10, "n_draws": 80, "alpha": 0.01, "noise_batch": 400}

    # resuming a finished run gives its stored numbers
    assert main([*CERTIFY, "--model", str(checkpoint), "--sigma", "0.25", "--db", str(db), "--json", "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["run_id"] == out["run_id"] and again["certified_accuracy"] == out["certified_accuracy"]

    assert main(["report", out["run_id"], "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Certified accuracy" in page and "ACR" in page and "data:image/png;base64" in page
    assert f"{out['acr']:.4f}" in page


def test_laplace_gives_l1_certificates(checkpoint, tmp_path, capsys):
    assert main([*CERTIFY, "--model", str(checkpoint), "--noise", "laplace", "--sigma", "0.25", "--db",
                 str(tmp_path / "l.db"), "--json", "--no-attack-check"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["norm"] == "l1" and out["lie_check"]["attacked"] == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--sigma", "0"], "--sigma must be > 0"),
    (["--sigma", "-0.5"], "--sigma must be > 0"),
    (["--sigma", "0.25", "--alpha", "1.5"], "--alpha must be in (0, 1)"),
    (["--sigma", "0.25", "--alpha", "0"], "--alpha must be in (0, 1)"),
    (["--sigma", "0.25", "--n0", "500"], "--n0 (500) must not exceed --n (80)"),
    (["--noise", "ablation"], "--noise ablation needs --keep"),
    ([], "--noise gaussian needs --sigma"),
])
def test_bad_input_gives_one_clear_line(checkpoint, tmp_path, capsys, extra, message):
    db = tmp_path / "bad.db"
    assert main([*CERTIFY, "--model", str(checkpoint), "--db", str(db), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("robustlab: error: ") and message in err[-1]
    assert not db.exists() or not ResultsStore(db).list_runs()


def test_unknown_method_is_refused_by_the_parser(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*CERTIFY, "--model", str(checkpoint), "--sigma", "0.25", "--method", "lipschitz"])
    assert exc.value.code == 2 and "invalid choice: 'lipschitz'" in capsys.readouterr().err


def test_too_few_draws_warns_and_says_the_n_that_can(checkpoint, tmp_path, capsys):
    args = ["certify", "--data", "digits", "--samples", "2", "--n", "5", "--n0", "2", "--alpha", "0.001",
            "--no-attack-check", "--model", str(checkpoint), "--sigma", "0.25", "--db", str(tmp_path / "w.db"), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "robustlab: warning: n=5 draws cannot certify anything at alpha=0.001" in captured.err
    assert "use n >= 10" in captured.err
    assert json.loads(captured.out)["abstain_rate"] == 1.0


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    certify = sub.choices["certify"]
    missing = [a.option_strings for a in certify._actions if a.option_strings and a.dest != "help" and not a.help]
    assert not missing
