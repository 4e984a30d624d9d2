"""The report of a certified run (randomized smoothing): certified accuracy against radius, the
average certified radius (ACR), the attack check, with the same checks, model and environment
sections as every report, plus ``summary.json`` and ``samples.csv`` (one row per certified sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustlab.eval.store import ResultsStore
from robustlab.report import html as page
from robustlab.report.plots import (
    ci_text,
    format_percent,
    norm_name,
    plot_certified_curve,
)


def _noise_text(summary: dict[str, Any]) -> str:
    noise = summary["noise"]
    params = ", ".join(f"{k} = {v:g}" if isinstance(v, (int, float)) else f"{k} = {v}" for k, v in noise["params"].items())
    return f"{noise['name']} ({params})"


def _body(run: dict[str, Any], summary: dict[str, Any], rows: list[Any], partial: bool) -> list[str]:
    norm = summary["norm"]
    st = summary["settings"]
    n = summary["n"]
    sub = (f'<p class="sub">{page._e(run["dataset"])} / {page._e(run["split"])}, n = {page._int(n)} · randomized '
           f"smoothing, {page._e(_noise_text(summary))} · {page._e(norm_name(norm))} certificates · run "
           f"<code>{page._e(run['run_id'])}</code></p>")
    parts = [f"<h1>Certification report: {page._e(run['model'])}</h1>", sub]
    if partial or run.get("status") != "complete":
        parts.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(run.get("status"))}).'
                     f"</strong> {page._int(n)} of {page._int(run['n'])} samples are certified so far.</div>")
    parts.append(page._kv_table([
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"), ("Samples (n)", run["n"]),
        ("Noise", _noise_text(summary)), ("Draws to select (n0)", st["n0"]), ("Draws to estimate (n)", st["n_draws"]),
        ("Failure probability (alpha)", st["alpha"]), ("Seed", run["seed"]), ("Status", run.get("status")),
        ("Run id", run["run_id"]), ("Time certifying and attacking (s)", f"{float(summary.get('seconds') or 0):,.1f}"),
    ]))
    acc = summary["certified_accuracy"]
    first = next(iter(acc.values()), None)
    parts.append(
        "<h2>Certified accuracy</h2><div class=\"headline\">"
        f'<div class="metric"><div class="value">{summary["acr"]:.4f}</div><div class="label">ACR (average certified '
        f"radius, {page._e(norm_name(norm))}; 0 for wrong or abstained samples)</div></div>"
        f'<div class="metric"><div class="value">{format_percent(first)}</div><div class="label">certified accuracy at '
        f"radius 0<br>{page._e(ci_text(first, n))}</div></div>"
        f'<div class="metric"><div class="value">{format_percent(summary["abstain_rate"])}</div><div class="label">'
        "abstained</div></div></div>")
    certified = [r["radius"] for r in rows if r["correct"] and r["radius"] is not None]
    emp = summary.get("empirical")
    parts.append(page._img(plot_certified_curve(
        certified, n, norm, {float(r): a for r, a in acc.items()},
        (emp["radius"], emp["empirical_accuracy"]) if emp else None, f"{run['model']}, {_noise_text(summary)}",
        summary.get("max_radius")),
        "certified accuracy against radius"))
    table = "".join(f'<tr><td class="num">{page._e(r)}</td><td class="num">{format_percent(a)}</td>'
                    f"<td>{page._e(ci_text(a, n))}</td></tr>" for r, a in acc.items())
    parts.append('<table><tr><th class="num">radius</th><th class="num">certified accuracy</th><th>95% interval '
                 "(test sample)</th></tr>" + table + "</table>"
                 '<p class="muted">A sample counts at radius r when the smoothed classifier predicts its label and '
                 "certifies a radius of at least r; each certificate holds with probability at least 1 − alpha "
                 "(CERTIFY of Cohen et al. 2019)."
                 + (f" With n = {st['n_draws']} draws no radius above {summary['max_radius']:.4g} can be certified "
                    "(n unanimous votes); more draws certify larger radii." if summary.get("max_radius") else "")
                 + "</p>")
    lie = summary.get("lie_check") or {}
    text = (f"<p>Attack check: PGD with expectation over the noise on the soft smoothed classifier, inside each "
            f"certified radius, on {page._int(lie.get('attacked'))} certificates: <strong>"
            f"{page._int(lie.get('contradicted'))} contradicted</strong> (PREDICT at the point found returned another "
            f"class; {page._int(lie.get('abstained_under_attack'))} abstained), against at most "
            f"{lie.get('expected_at_most', 0):.3g} expected from the failure rate (2 alpha per certificate).</p>")
    if emp:
        text += (f"<p>At radius {emp['radius']:g} on the first {page._int(emp['checked'])} samples: certified accuracy "
                 f"{format_percent(emp['certified_accuracy'])}, empirical accuracy under the attack "
                 f"{format_percent(emp['empirical_accuracy'])}: a gap of {100 * emp['gap']:.1f} points between what "
                 "is proven and what the attack breaks.</p>")
    parts.append("<h2>No certificate may lie</h2>" + text)
    return parts


def write_certified_report(store: ResultsStore, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` of a certified run into ``out``."""
    return page.write_protocol_report(store, info, out, "robustlab certification", _body)


