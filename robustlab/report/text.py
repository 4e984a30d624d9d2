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
    naive = s.get("non_adaptive")
    if naive:  # a defended model: what non-adaptive attacks would have reported, beside the headline
        parts = [f"{100 * v:.2f}% {what}" for what, v in (("attacking it as a plain model", naive.get("robust_accuracy")),
                 ("transferred from the undefended model", naive.get("transfer_robust_accuracy"))) if v is not None]
        if parts:
            lines.append(f"  non-adaptive     {'; '.join(parts)} (not the robust accuracy: see adaptive-gap)")
    if len(s["eps_curve"]) > 2:
        norm = s["threat"]["norm"]
        lines.append("  eps curve: " + ", ".join(f"{format_eps(norm, p['eps'])}: {100 * p['robust_accuracy']:.1f}%"
                                                 for p in s["eps_curve"]))
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def format_certified(s: dict[str, Any], checks: list[dict[str, str]], title: str) -> str:
    """A certified run's summary as ``robustlab certify`` prints it: certified accuracy per radius
    with its 95% interval, ACR, abstentions, the attack check, then one line per check."""
    noise = s["noise"]
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in noise["params"].items())
    st = s["settings"]
    head = (f"{title} (n={s['n']}), smoothing {noise['name']} ({params}), {s['norm']} radii; "
            f"n0={st['n0']}, n={st['n_draws']}, alpha={st['alpha']:g}")
    lines = [head]
    for r, a in s["certified_accuracy"].items():
        lines.append(f"  certified accuracy at radius {r:>5}  {100 * a:6.2f}%   ({ci_text(a, s['n'])})")
    lines.append(f"  average certified radius (ACR) {s['acr']:.4f}; abstained on {100 * s['abstain_rate']:.1f}%")
    emp = s.get("empirical")
    if emp:
        lines.append(f"  at radius {emp['radius']:g} on the first {emp['checked']}: certified {100 * emp['certified_accuracy']:.1f}%, "
                     f"empirical (attack) {100 * emp['empirical_accuracy']:.1f}%, gap {100 * emp['gap']:.1f} points")
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)
