"""Plain-text summaries for the terminal."""

from __future__ import annotations

from typing import Any

from robustlab.report.plots import ci_text
from robustlab.threat import format_eps


def format_summary(s: dict[str, Any], checks: list[dict[str, str]]) -> str:
    """An evaluation's summary (the runner's ``result.summary``) and its sanity checks as the lines
    ``robustlab eval`` prints: accuracies in percent with their 95% intervals, one line per attack,
    the epsilon curve when it has more than two points, then one line per check."""
    lines = [
        f"{s['model']} on {s['dataset']}:{s['split']} (n={s['n']}), {s['threat']['norm']} eps={format_eps(s['threat']['norm'], s['threat']['eps'])}",
        f"  clean accuracy   {100 * s['clean_accuracy']:6.2f}%   ({ci_text(s['clean_accuracy'], s['n'])})",
    ]
    for a in s["attacks"]:
        lines.append(f"  after {a['name']:<10} {100 * a['robust_accuracy']:6.2f}%   ({a['broken']} broken, {a['seconds']:.2f}s)")
    lines.append(f"  robust accuracy  {100 * s['robust_accuracy']:6.2f}%   ({ci_text(s['robust_accuracy'], s['n'])})")
    ensemble = s.get("ensemble_robust_accuracy")
    if ensemble is not None and ensemble != s["robust_accuracy"]:
        lines.append(f"    (the ensemble alone: {100 * ensemble:.2f}%; other attack settings of this run broke more, "
                     "see the worst-case check)")
    if len(s["eps_curve"]) > 2:
        norm = s["threat"]["norm"]
        lines.append("  eps curve: " + ", ".join(f"{format_eps(norm, p['eps'])}: {100 * p['robust_accuracy']:.1f}%"
                                                 for p in s["eps_curve"]))
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)
