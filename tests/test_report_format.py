"""How the report and the terminal write a run (issue 19 item 11): only parameters that apply, a
step size left to the attack as the value it took, epsilons as fractions of 255 where they are (one
format everywhere), tables that stay inside their column, and no two-point "curve"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robustlab.attacks import create_attack
from robustlab.cli import main
from robustlab.threat import ThreatModel, format_eps

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("norm, eps, text", [("linf", 8 / 255, "8/255 (0.03137)"), ("linf", 0.3, "0.3"),
                                             ("linf", 0.5 / 255, "0.5/255 (0.001961)"), ("l2", 0.5, "0.5"),
                                             ("l2", 1 / 3, "0.3333"), ("linf", 0.0, "0")])
def test_one_epsilon_format(norm, eps, text):
    assert format_eps(norm, eps) == text
    assert str(ThreatModel(norm, eps)) == f"{norm} eps={text}"


def test_shown_parameters_follow_one_rule():
    linf, l1 = ThreatModel("linf", 8 / 255), ThreatModel("l1", 10.0)
    pgd = create_attack("pgd", linf, steps=10)
    shown = pgd.shown_params()
    assert "l1_sparsity" not in shown  # applies under l1 only
    assert shown["alpha"] == float(f"{2.5 * (8 / 255) / 10:.4g}")  # derived, not None
    assert create_attack("pgd", l1).shown_params()["l1_sparsity"] == 0.95
    assert create_attack("bim", linf, steps=4).shown_params()["alpha"] == float(f"{(8 / 255) / 4:.4g}")
    ssp = create_attack("ssp", linf).shown_params()
    assert "layer" not in ssp and "feature_model" not in ssp and ssp["alpha"] > 0
    assert create_attack("nes", linf).shown_params()["alpha"] == float(f"{(8 / 255) / 10:.4g}")


def test_report_and_terminal_of_a_run_without_a_grid(tmp_path, capsys):
    db = tmp_path / "r.db"
    assert main(["eval", "--model", str(GOLDEN / "digits_cnn.safetensors"), "--data", "digits", "--norm", "linf",
                 "--eps", "8/255", "--attack", "fgsm", "--attack", "pgd:steps=5", "--no-sanity", "--steps-grid",
                 "none", "--n", "20", "--db", str(db), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "linf eps=8/255 (0.03137)" in out and "0.0313725" not in out
    assert main(["report", "latest", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    body = page[page.index("<body>"):]
    results = body[body.index("<h2>Results</h2>"):body.index("<h2>Curves</h2>")]
    assert "l1_sparsity" not in results and "null" not in results and "None" not in results
    assert re.search(r"steps=5, alpha=0\.01569", results)
    shown = re.sub(r"<details>.*?</details>", "", body, flags=re.DOTALL)  # all but the raw configuration (JSON)
    assert "0.0313725" not in shown and "8/255" in shown
    assert '<div class="scroll"><table>' in results and ".scroll { max-width: 100%; overflow-x: auto; }" in page
    curves = body[body.index("<h2>Curves</h2>"):]
    assert "No epsilon curve: the run measured clean accuracy and its own ε only" in curves
    assert 'alt="robust accuracy against epsilon"' not in curves
