"""The house's layering (../shared/DESIGN.md): data flows one way, so lower layers import nothing
from higher ones, and attacks and defenses do not import each other (the evaluation pairs them).
Checked on every import statement of the package, function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "robustlab"

LOW = {"threat", "threat_kinds", "losses", "predictor", "params", "checks", "registry", "seeding", "errors", "progress",
       "distributed", "models", "data"}
FORBIDDEN = {
    **{name: {"attacks", "defenses", "training", "eval", "report", "cli", "demo"} for name in LOW},
    "attacks": {"defenses", "training", "eval", "report", "cli", "demo"},
    "defenses": {"attacks", "training", "eval", "report", "cli", "demo"},
    "certify": {"attacks", "defenses", "training", "eval", "report", "cli", "demo"},
    "training": {"defenses", "eval", "report", "cli", "demo"},
    "eval": {"report", "cli", "training", "demo"},
    "report": {"cli", "training", "demo"},
    "vlm": {"eval", "report", "cli", "demo"},
}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robustlab."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "robustlab":
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("robustlab."))
    return out


def test_lower_layers_import_nothing_from_higher_ones():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        for target in _imported(ast.parse(path.read_text(encoding="utf-8"))) & FORBIDDEN.get(layer, set()):
            bad.append(f"{path.relative_to(PACKAGE.parent)} ({layer}) imports robustlab.{target}")
    assert not bad, "\n".join(bad)
