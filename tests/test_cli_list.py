"""`robustlab list WHAT`: one line per registered name, read from the registries (so components
registered later are listed too), each with a one-line description."""

from __future__ import annotations

import re

import pytest

from robustlab.cli import main
from robustlab.cli.listing import KINDS


def _registry(what: str):
    from robustlab.attacks.base import ATTACKS
    from robustlab.attacks.suites import SUITES
    from robustlab.corruptions import CORRUPTIONS
    from robustlab.data.catalog import DATASETS
    from robustlab.defenses import DEFENSES
    from robustlab.defenses.detection import DETECTORS
    from robustlab.models.registry import MODELS
    from robustlab.training.objectives import OBJECTIVES

    return {"attacks": ATTACKS, "suites": SUITES, "models": MODELS, "recipes": OBJECTIVES, "datasets": DATASETS,
            "defenses": DEFENSES, "detectors": DETECTORS, "corruptions": CORRUPTIONS}[what]


@pytest.mark.parametrize("what", list(KINDS))
def test_one_line_per_registered_name(what, capsys):
    assert main(["list", what]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = _registry(what).names()
    if not names:
        assert lines == [f"no {what} are registered in this installation"]
        return
    assert [line.split()[0] for line in lines] == names
    for line in lines:
        _, _, text = line.partition("  ")
        assert len(text.strip()) > 8 and len(line) <= 140 and "``" not in line, line


def test_known_lines(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("pgd ") and "[white-box, linf/l2/l1] Projected gradient" in line for line in out.splitlines())
    assert "Goodfellow et al. 2015" in out  # "et al." does not end the sentence
    assert main(["list", "models"]) == 0
    assert any(line.startswith("digits_cnn ") and "[1x8x8, digits]" in line for line in capsys.readouterr().out.splitlines())
    assert main(["list", "suites"]) == 0
    assert "standard  suite of attacks, run in order: apgd-ce, apgd-t, fab-t, square" in capsys.readouterr().out


def test_a_component_registered_later_is_listed(capsys):
    from robustlab.corruptions import CORRUPTIONS, Corruption

    class Fog(Corruption):
        """Fog made of nothing, for this test."""

        name = "test-fog"
        family = "weather"

    CORRUPTIONS.register("test-fog")(Fog)
    try:
        assert main(["list", "corruptions"]) == 0
        assert re.search(r"^test-fog +\[weather\] Fog made of nothing, for this test$", capsys.readouterr().out, re.M)
    finally:
        del CORRUPTIONS._items["test-fog"]


def test_an_unknown_kind_is_argparse_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["list", "widgets"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'widgets'" in err and err.count("error:") == 1
