"""Attack suites and ensemble files."""

from __future__ import annotations

import json

import pytest

from robustlab.attacks import SUITES, build_attacks
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel

LINF = ThreatModel("linf", 8 / 255)


def test_standard_suite_is_autoattack_standard():
    attacks = build_attacks(["standard"], LINF)
    assert [a.name for a in attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert attacks[0].params["steps"] == 100 and attacks[1].params["n_target_classes"] == 9
    assert attacks[2].params["n_target_classes"] == 9 and attacks[3].params["queries"] == 5000
    assert [a.kind for a in attacks] == ["white-box", "white-box", "white-box", "score-based"]


def test_rand_suite_uses_eot():
    attacks = build_attacks(["rand"], LINF)
    assert [a.name for a in attacks] == ["apgd-ce", "apgd-dlr"] and all(a.params["eot"] == 20 for a in attacks)


def test_ensemble_files_text_and_json(tmp_path):
    text = tmp_path / "ens.txt"
    text.write_text("# my ensemble\nfgsm\npgd:steps=7,loss=cw  # strong one\n\n")
    assert [(a.name, a.params.get("steps")) for a in build_attacks([str(text)], LINF)] == [("fgsm", None), ("pgd", 7)]
    js = tmp_path / "ens.json"
    js.write_text(json.dumps(["fgsm", {"name": "pgd", "params": {"steps": 3}}]))
    assert [a.name for a in build_attacks([str(js), "mifgsm"], LINF)] == ["fgsm", "pgd", "mifgsm"]


def test_paths_inside_attack_parameters_are_not_files():
    with pytest.raises(RobustlabError, match="unknown attack|has no parameter"):
        build_attacks(["nosuch:surrogate=dir/m.safetensors"], LINF)


def test_bad_ensembles(tmp_path):
    with pytest.raises(RobustlabError, match="does not exist"):
        build_attacks([str(tmp_path / "none.txt")], LINF)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RobustlabError, match="not valid JSON"):
        build_attacks([str(bad)], LINF)
    with pytest.raises(RobustlabError, match="takes no parameters"):
        build_attacks(["standard:steps=3"], LINF)
    assert "standard" in SUITES and "rand" in SUITES
