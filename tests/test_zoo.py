"""The local model zoo: add (hash-verified), list, show, load by name, refuse tampered weights."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_net

from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.models import ModelCard, load_model, save_checkpoint


@pytest.fixture()
def checkpoint(tmp_path, digits_model):
    card = ModelCard.for_architecture("digits_cnn", clean_accuracy=0.97, dataset="digits:train")
    return save_checkpoint(digits_model, tmp_path / "ckpt" / "m.safetensors", card)


def test_add_list_show_and_load_by_name(tmp_path, checkpoint, digits_model, digits_test, capsys, monkeypatch):
    zoo = tmp_path / "zoo"
    db = tmp_path / "r.db"
    assert main(["eval", "--model", str(checkpoint), "--data", "digits", "--n", "40", "--norm", "linf", "--eps", "0.1",
                 "--attack", "fgsm", "--steps-grid", "none", "--no-sanity", "--db", str(db), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert main(["zoo", "add", str(checkpoint), "--name", "digits-std", "--zoo", str(zoo), "--run", run["run_id"],
                 "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["zoo", "list", "--zoo", str(zoo)]) == 0
    listing = capsys.readouterr().out
    assert "digits-std" in listing and f"{100 * run['robust_accuracy']:.2f}%" in listing
    assert main(["zoo", "show", "digits-std", "--zoo", str(zoo)]) == 0
    card = json.loads(capsys.readouterr().out)
    # The card keeps the trainer's clean accuracy; the run's (on its 40 examples) goes with its robust number.
    assert card["clean_accuracy"] == 0.97 and len(card["sha256"]) == 64
    (key,) = card["robust_accuracy"]
    assert f"n=40, clean {100 * run['clean_accuracy']:.2f}%" in key
    monkeypatch.setenv("ROBUSTLAB_ZOO", str(zoo))
    loaded = load_model("zoo:digits-std")
    assert loaded.source == "zoo"
    x = digits_test.x[:8]
    assert torch.equal(loaded.model(x), digits_model(x))


def test_tampered_zoo_weights_are_refused(tmp_path, checkpoint, monkeypatch):
    zoo = tmp_path / "zoo"
    assert main(["zoo", "add", str(checkpoint), "--name", "m", "--zoo", str(zoo)]) == 0
    weights = zoo / "m.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("ROBUSTLAB_ZOO", str(zoo))
    with pytest.raises(RobustlabError, match="does not match its card"):
        load_model("zoo:m")


def test_unknown_zoo_model_and_bad_names(tmp_path, checkpoint, capsys):
    assert main(["eval", "--model", "zoo:nothing", "--data", "digits", "--norm", "linf", "--eps", "0.1",
                 "--db", str(tmp_path / "r.db")]) == 2
    assert "no model 'nothing' in the zoo" in capsys.readouterr().err
    assert main(["zoo", "add", str(checkpoint), "--name", "../evil", "--zoo", str(tmp_path / "zoo")]) == 2
    assert main(["zoo", "add", str(checkpoint), "--name", "ok", "--zoo", str(tmp_path / "zoo")]) == 0
    assert main(["zoo", "add", str(checkpoint), "--name", "ok", "--zoo", str(tmp_path / "zoo")]) == 2
    assert "already has" in capsys.readouterr().err


def test_overwriting_with_the_same_weights_keeps_recorded_accuracies(tmp_path, checkpoint, digits_model, capsys):
    zoo, db = tmp_path / "zoo", tmp_path / "r.db"
    runs = []
    for attack in ("fgsm", "pgd"):
        assert main(["eval", "--model", str(checkpoint), "--data", "digits", "--n", "30", "--norm", "linf", "--eps", "0.1",
                     "--attack", attack, "--steps-grid", "none", "--no-sanity", "--db", str(db), "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["run_id"])
    for run_id in runs:
        assert main(["zoo", "add", str(checkpoint), "--name", "m", "--zoo", str(zoo), "--run", run_id, "--db", str(db),
                     "--overwrite"]) == 0
    keys = list(json.loads((zoo / "m.json").read_text())["robust_accuracy"])
    assert len(keys) == 2 and any(runs[0] in k for k in keys) and any(runs[1] in k for k in keys)
    # Other weights under the same name: the old accuracies were not measured on them.
    changed = copy.deepcopy(digits_model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    other = save_checkpoint(changed, tmp_path / "o" / "o.safetensors",
                            ModelCard.for_architecture("digits_cnn", dataset="digits:train"))
    assert main(["zoo", "add", str(other), "--name", "m", "--zoo", str(zoo), "--overwrite"]) == 0
    assert json.loads((zoo / "m.json").read_text())["robust_accuracy"] is None


def _add_and_list(weights, name, zoo, capsys) -> list[str]:
    """`zoo add` the checkpoint as ``name``, then `zoo list`: the entry's source, model and defense columns."""
    assert main(["zoo", "add", str(weights), "--name", name, "--zoo", str(zoo)]) == 0
    capsys.readouterr()
    assert main(["zoo", "list", "--zoo", str(zoo)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{name} ")]
    return row.split()[1:4]


def test_entry_point_model_in_the_zoo(tmp_path, digits_test, capsys, monkeypatch):
    model, weights = save_tiny_net(tmp_path / "ckpt")
    zoo = tmp_path / "zoo"
    assert _add_and_list(weights, "tiny", zoo, capsys) == ["entry-point", "tiny_net.py:build", "—"]
    assert main(["zoo", "show", "tiny", "--zoo", str(zoo)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert (card["source"], card["arch_kwargs"], card["defense"]) == ("entry-point", {"width": 12}, [])
    monkeypatch.setenv("ROBUSTLAB_ZOO", str(zoo))
    loaded = load_model("zoo:tiny")
    assert (loaded.source, loaded.card.entry_point, loaded.defense) == ("zoo", card["entry_point"], [])
    x = digits_test.x[:16]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # It is evaluated like any other model.
    assert main(["eval", "--model", "zoo:tiny", "--data", "digits", "--n", "20", "--norm", "linf", "--eps", "0.1",
                 "--attack", "fgsm", "--steps-grid", "none", "--no-sanity", "--db", str(tmp_path / "r.db"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20


def test_defended_model_in_the_zoo(tmp_path, capsys, monkeypatch):
    defense = [{"name": "bit-depth", "params": {"bits": 3}}, {"name": "noise", "params": {"draws": 2, "sigma": 0.05}}]
    _, weights = save_tiny_net(tmp_path / "ckpt", defense=defense)
    zoo = tmp_path / "zoo"
    assert _add_and_list(weights, "tiny-def", zoo, capsys) == ["defended", "tiny_net.py:build", "bit-depth+noise"]
    assert main(["zoo", "show", "tiny-def", "--zoo", str(zoo)]) == 0
    assert json.loads(capsys.readouterr().out)["defense"] == defense
    monkeypatch.setenv("ROBUSTLAB_ZOO", str(zoo))
    assert load_model("zoo:tiny-def").defense == defense
    # Evaluated behind its defenses, which the run records.
    db = tmp_path / "r.db"
    assert main(["eval", "--data", "digits", "--n", "20", "--db", str(db), "--model", "zoo:tiny-def", "--norm", "linf",
                 "--eps", "0.1", "--attack", "fgsm", "--no-sanity", "--steps-grid", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["defenses"] == defense
    # A card naming a defense this robustlab does not have: one line, nothing written.
    _, bad = save_tiny_net(tmp_path / "bad", defense=[{"name": "jpeg2000", "params": {"quality": 75}}])
    assert main(["zoo", "add", str(bad), "--name", "tiny-jpeg2000", "--zoo", str(zoo)]) == 0
    capsys.readouterr()
    for args in (["eval", "--data", "digits", "--db", str(tmp_path / "r2.db")],
                 ["perturb", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "out")]):
        assert main([*args, "--model", "zoo:tiny-jpeg2000", "--norm", "linf", "--eps", "0.1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("robustlab: error: unknown defense 'jpeg2000'") and err.count("\n") == 1
    assert not (tmp_path / "r2.db").exists()


def test_zoo_add_defense_and_defended_runs(tmp_path, capsys):
    """``zoo add --defense`` makes a defended entry of plain weights; ``--run`` of a defended evaluation
    takes the run's defenses, and refuses a defense list the run did not evaluate."""
    _, weights = save_tiny_net(tmp_path / "ckpt")
    zoo, db = tmp_path / "zoo", tmp_path / "r.db"
    assert main(["zoo", "add", str(weights), "--name", "sq", "--zoo", str(zoo), "--defense", "bit-depth:bits=2"]) == 0
    capsys.readouterr()
    assert main(["zoo", "show", "sq", "--zoo", str(zoo)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["source"] == "defended" and card["defense"] == [{"name": "bit-depth", "params": {"bits": 2}}]
    assert main(["eval", "--data", "digits", "--n", "20", "--db", str(db), "--model", str(weights), "--norm", "linf",
                 "--eps", "0.1", "--attack", "fgsm", "--no-sanity", "--steps-grid", "none",
                 "--defense", "bit-depth:bits=2"]) == 0
    capsys.readouterr()
    assert main(["zoo", "add", str(weights), "--name", "sq-run", "--zoo", str(zoo), "--run", "latest", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["zoo", "show", "sq-run", "--zoo", str(zoo)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["defense"] == [{"name": "bit-depth", "params": {"bits": 2}}] and card["robust_accuracy"]
    assert main(["zoo", "add", str(weights), "--name", "x", "--zoo", str(zoo), "--run", "latest", "--db", str(db),
                 "--defense", "bit-depth:bits=3"]) == 2
    assert "do not describe this entry" in capsys.readouterr().err


def test_old_checkpoint_joins_the_zoo(tmp_path, capsys, monkeypatch):
    golden = Path(__file__).parent / "golden"
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(golden / f"digits_cnn{suffix}", tmp_path / f"old{suffix}")
    zoo = tmp_path / "zoo"
    assert _add_and_list(tmp_path / "old.safetensors", "old", zoo, capsys) == ["registry", "digits_cnn", "—"]
    monkeypatch.setenv("ROBUSTLAB_ZOO", str(zoo))
    card = load_model("zoo:old").card
    sha256 = json.loads((golden / "digits_cnn.json").read_text())["sha256"]
    assert (card.source, card.mean, card.sha256) == ("registry", (0.3053,), sha256)
