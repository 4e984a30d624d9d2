"""Plain-text summary of a verified run (bound propagation, ``robustlab.eval.protocols.verified``)."""

from __future__ import annotations

from typing import Any

from robustlab.report.plots import ci_text


def format_verified(s: dict[str, Any], checks: list[dict[str, str]], title: str) -> str:
    """The lines ``robustlab certify --method ibp|crown-ibp`` prints: clean, verified and empirical (PGD)
    accuracy in percent with their 95% intervals, the gap, then one line per check."""
    n, threat = s["n"], s["threat"]
    lines = [f"{title} (n={n}), {threat['norm']} eps={threat['eps']:g}, verified by {s['method']}",
             f"  clean accuracy      {100 * s['clean_accuracy']:6.2f}%   ({ci_text(s['clean_accuracy'], n)})",
             f"  verified accuracy   {100 * s['verified_accuracy']:6.2f}%   ({ci_text(s['verified_accuracy'], n)})"]
    if s.get("empirical_robust_accuracy") is not None:
        attack = s.get("soundness_attack") or {}
        steps = (attack.get("params") or {}).get("steps")
        lines.append(f"  PGD-{steps} accuracy    {100 * s['empirical_robust_accuracy']:6.2f}%   "
                     f"({ci_text(s['empirical_robust_accuracy'], n)})")
        lines.append(f"  gap (PGD - verified) {100 * s['gap']:5.2f} points; verified points PGD broke: {s['lies']}")
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)
