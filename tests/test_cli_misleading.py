"""Misleading behaviour a new user met (issue 19 item 10): the demo report shows the checkpoint's
sha256, an unknown architecture is said before any data is loaded, a file that is not a checkpoint is
called so."""

from __future__ import annotations

import json

import pytest

import robustlab.data
from robustlab.cli import main
from robustlab.models.checkpoint import sha256_file


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("robustlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def test_the_demo_report_shows_the_weights_sha256(tmp_path):
    from robustlab.demo import run_demo

    paths = run_demo(tmp_path, log=lambda msg: None, epochs=1, n=32)
    digest = sha256_file(paths["checkpoint"])
    assert json.loads(paths["checkpoint"].with_suffix(".json").read_text())["sha256"] == digest
    assert digest in paths["report"].read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert digest in json.dumps(summary)


def test_an_unknown_architecture_is_said_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the model name was checked")

    monkeypatch.setattr(robustlab.data, "load_dataset", no_loading)
    assert main(["train", "--model", "smallcnnn", "--data", "mnist", "--out", str(tmp_path / "x.safetensors")]) == 2
    line = _error(capsys)
    assert "unknown model 'smallcnnn'" in line and "smallcnn" in line


@pytest.mark.parametrize("name, content", [("model.txt", b"weights?\n"), ("model.safetensors", b"\x00" * 4),
                                           ("model.pt", b"PK\x03\x04 not a zip")])
def test_a_file_that_is_not_a_checkpoint_is_called_so(name, content, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["zoo", "add", str(path), "--name", "m", "--zoo", str(tmp_path / "zoo")]) == 2
    line = _error(capsys)
    assert f"{path} is not a checkpoint" in line and "no model card" not in line
    assert not (tmp_path / "zoo").exists()
