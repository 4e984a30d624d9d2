"""Reports of a verified run (bound propagation, ``robustlab.eval.protocols.verified``): the text summary
``robustlab certify`` prints and the HTML page ``robustlab report`` writes."""

from __future__ import annotations

from pathlib import Path
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


def write_verified_report(store: Any, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` of a verified run into ``out``."""
    from robustlab.report import html as page

    return page.write_protocol_report(store, info, out, "robustlab verification",
                                      lambda run, s, rows, partial: _body(run, s, partial))


def _body(run: dict[str, Any], s: dict[str, Any], partial: bool) -> list[str]:
    from robustlab.report import html as page
    from robustlab.report.plots import format_percent

    n, threat = s["n"], s["threat"]
    attack = s.get("soundness_attack")
    parts = [f"<h1>Verification report: {page._e(run['model'])}</h1>",
             f'<p class="sub">{page._e(run["dataset"])} / {page._e(run["split"])}, n = {page._int(n)} · '
             f"{page._e(threat['norm'])} eps = {threat['eps']:g} · verified by {page._e(s['method'])} · run "
             f"<code>{page._e(run['run_id'])}</code></p>"]
    if partial or run.get("status") != "complete":
        parts.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(run.get("status"))}).'
                     f"</strong> {page._int(n)} of {page._int(run['n'])} samples are verified so far.</div>")
    parts.append(page._kv_table([
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"), ("Samples (n)", n),
        ("Bounds", s["method"]), ("Threat model", f"{threat['norm']} ball of radius {threat['eps']:g} in [0, 1]"),
        ("Soundness attack", f"PGD, {attack['params']['steps']} steps x {attack['params']['restarts']} restart(s)"
         if attack else "none"), ("Seed", run["seed"]), ("Status", run.get("status")), ("Run id", run["run_id"]),
    ]))
    metrics = [("clean accuracy", s["clean_accuracy"]), ("verified robust accuracy", s["verified_accuracy"])]
    if s.get("empirical_robust_accuracy") is not None:
        metrics.append(("empirical robust accuracy (PGD)", s["empirical_robust_accuracy"]))
    parts.append("<h2>Verified robust accuracy</h2><div class=\"headline\">" + "".join(
        f'<div class="metric"><div class="value">{format_percent(v)}</div><div class="label">{page._e(label)}<br>'
        f"{page._e(ci_text(v, n))}</div></div>" for label, v in metrics) + "</div>"
        '<p class="muted">A sample is verified when the lower bound of its margin z_y - z_j over the whole ball is '
        "positive for every other class j: no input of the ball can change its (correct) prediction.</p>")
    if attack:
        text = (f"<p>PGD at eps = {threat['eps']:g} on every correctly classified sample broke "
                f"<strong>{page._int(s['lies'])} verified samples</strong> (it must be 0: a broken certificate is a bug "
                f"in the bounds). The gap between verified and empirical robust accuracy is {100 * s['gap']:.2f} "
                "points: what the bounds cannot prove but the attack does not break.</p>")
    else:
        text = "<p>No attack checked the certificates (--no-attack-check).</p>"
    parts.append("<h2>No certificate may lie</h2>" + text)
    return parts
