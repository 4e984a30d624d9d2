"""One self-contained HTML report per run, plus its numbers as ``summary.json`` and ``samples.csv``.

The HTML page has no external resources and no JavaScript: CSS is inline and plots are embedded as
base64 PNG data URIs, so the file can be mailed, archived or attached to a paper as it is. Every string
that comes from the store (model names, attack parameters, check details, model cards) is HTML-escaped.

A run that did not finish (no summary in the store) still gets a report, built from the per-task
counts of the samples done so far, under a visible "incomplete" banner.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from robustlab.report.plots import (
    ci_text,
    format_eps,
    format_percent,
    norm_name,
    plot_eps_curve,
    plot_gallery,
    plot_steps_curve,
)
from robustlab.eval.metrics import RobustAccuracy
from robustlab.eval.protocols import protocol_class
from robustlab.eval.store import ResultsStore, SampleRow

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 0 auto; padding: 24px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin-bottom: 4px; word-break: break-all; }
h2 { font-size: 20px; border-bottom: 2px solid #e3e3e8; padding-bottom: 4px; margin-top: 34px; }
h3 { font-size: 16px; margin-bottom: 6px; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 10px 0 16px 0; }
.scroll { max-width: 100%; overflow-x: auto; }
td code { white-space: pre-wrap; overflow-wrap: anywhere; }
table.kv td { overflow-wrap: anywhere; }
th, td { border: 1px solid #d5d5dc; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f7; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 220px; }
code, pre { font-family: SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: #f6f6f9; padding: 10px; overflow-x: auto; border: 1px solid #e3e3e8; }
.banner { padding: 12px 16px; margin: 14px 0; border-radius: 6px; font-size: 15px; }
.banner.incomplete { background: #fff4d6; border: 2px solid #e0a800; color: #5c4400; }
.banner.failed { background: #fde2e2; border: 2px solid #c62828; color: #6d1010; }
.banner.warn { background: #fff8e1; border: 1px solid #e0a800; color: #5c4400; }
.banner.info { background: #e8f1fd; border: 1px solid #5b8fd6; color: #173a6b; }
.headline { display: flex; gap: 18px; flex-wrap: wrap; margin: 14px 0; }
.metric { border: 1px solid #d5d5dc; border-radius: 8px; padding: 10px 18px; min-width: 180px; }
.metric .value { font-size: 28px; font-weight: 700; font-variant-numeric: tabular-nums; }
.metric .label { color: #555; font-size: 13px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 700; font-size: 13px;
         text-transform: uppercase; letter-spacing: 0.03em; }
.badge.pass { background: #d8f3dc; color: #1b5e20; border: 1px solid #81c784; }
.badge.warn { background: #fff3c4; color: #6d4c00; border: 1px solid #e0a800; }
.badge.fail { background: #fde2e2; color: #8e0000; border: 1px solid #e57373; }
.badge.unknown { background: #eee; color: #444; border: 1px solid #bbb; }
tr.check-fail td { background: #fff5f5; }
tr.check-warn td { background: #fffbea; }
img.plot { max-width: 100%; border: 1px solid #e3e3e8; margin: 6px 0; }
.muted { color: #666; font-size: 13px; }
footer { margin-top: 40px; color: #777; font-size: 12px; border-top: 1px solid #e3e3e8; padding-top: 8px; }
"""

_STATUS_CLASSES = ("pass", "warn", "fail")


# ---------------------------------------------------------------------- small helpers

def _e(value: Any) -> str:
    """HTML-escape anything (``None`` becomes an em dash)."""
    if value is None:
        return "—"
    return html.escape(str(value), quote=True)


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _int(value: Any) -> str:
    if value is None:
        return "—"
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return _e(value)


def _seconds(value: Any) -> str:
    if value is None:
        return "—"
    try:
        return f"{float(value):,.1f}"
    except (TypeError, ValueError):
        return _e(value)


def _kv_table(items: Sequence[tuple[str, Any]], raw: bool = False) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v if raw else _e(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


def _defense_text(config: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (config.get("params") or {}).items())
    return f"{config.get('name')}({params})" if params else str(config.get("name"))


def _value_html(value: Any) -> str:
    """A model-card or environment value: scalars as text, lists/dicts as compact JSON."""
    if isinstance(value, (dict, list, tuple)):
        return f"<code>{_e(_json_text(value))}</code>"
    return _e(value)


# ---------------------------------------------------------------------- the numbers

def _task_stats(store: ResultsStore, run: dict[str, Any]) -> list[dict[str, Any]]:
    """For each task: its params, samples done, clean and robust accuracy, claims rejected."""
    batches = store.batch_stats(run["run_id"])
    out = []
    for t in run["tasks"]:
        rows = store.samples(run["run_id"], t["task"])
        m = RobustAccuracy().update([r.clean_correct for r in rows], [r.robust for r in rows],
                                    [r.broken_by for r in rows]).compute()
        out.append({**t, "done": m["n"], "clean_accuracy": m["clean_accuracy"],
                    "robust_accuracy": m["robust_accuracy"], "rejected": batches.get(t["task"], {}).get("rejected", 0)})
    return out


# ---------------------------------------------------------------------- HTML sections

def _threat(summary: dict[str, Any]) -> tuple[str, float]:
    return str(summary["threat"]["norm"]), float(summary["threat"]["eps"])


def _header(run: dict[str, Any], summary: dict[str, Any], partial: bool) -> str:
    norm, eps = _threat(summary)
    threat = f"{norm_name(norm)}, ε = {format_eps(norm, eps)}"
    parts = [
        f"<h1>Robustness report: {_e(run['model'])}</h1>",
        f'<p class="sub">{_e(run["dataset"])} / {_e(run["split"])}, n = {_int(run["n"])} · threat model '
        f"{_e(threat)} · run <code>{_e(run['run_id'])}</code></p>",
    ]
    status = str(run.get("status"))
    if status != "complete" or partial:
        cls = "failed" if status == "failed" else "incomplete"
        done = summary.get("done")
        progress = f" {_int(done)} of {_int(run['n'])} samples of the main evaluation are done." if done is not None else ""
        parts.append(
            f'<div class="banner {cls}"><strong>INCOMPLETE RUN (status: {_e(status)}).</strong> '
            f"The numbers below are partial, computed from the samples written so far.{progress} "
            "Sanity checks, curves and per-attack costs may be missing. Resume the run to finish it.</div>"
        )
    meta = [
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"),
        ("Samples (n)", run["n"]), ("Threat model", threat), ("Seed", run["seed"]), ("Status", status),
        ("Run id", run["run_id"]), ("Created", run.get("created")), ("Finished", run.get("finished")),
    ]
    if summary.get("seconds") is not None:
        label = "Time spent attacking so far (s)" if partial else "Time in attacks, all tasks (s)"
        meta.append((label, f"{float(summary['seconds']):,.1f}"))
    if summary.get("defenses"):
        meta.insert(1, ("Defenses (in order)", ", ".join(_defense_text(d) for d in summary["defenses"])))
    parts.append(_kv_table(meta))
    return "\n".join(parts)


def _warnings(run: dict[str, Any], summary: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    info = run.get("model_info") or {}
    out = []
    failed = [c for c in checks if str(c.get("status")) == "fail"]
    if failed:
        names = ", ".join(str(c.get("name")) for c in failed)
        out.append(f'<div class="banner failed"><strong>{len(failed)} sanity check(s) failed</strong> ({_e(names)}): '
                   "the robust accuracy may be overestimated (for example by gradient masking). "
                   "See the sanity checks below before trusting it.</div>")
    if info.get("randomized"):
        out.append('<div class="banner warn"><strong>Randomized model:</strong> its output changes between identical '
                   "calls. Attacks that use single gradients overestimate its robustness; an EOT (expectation over "
                   "transformation) evaluation is needed for a trustworthy number.</div>")
    forced = info.get("eval_mode_forced") or []
    if forced:
        out.append('<div class="banner info"><strong>Evaluated in eval mode:</strong> '
                   f"{len(forced)} submodule(s) were in train mode and were switched to eval mode for the evaluation: "
                   f"<code>{_e(', '.join(map(str, forced)))}</code>.</div>")
    rejected = summary.get("rejected") or 0
    if rejected:
        out.append(f'<div class="banner info"><strong>{_int(rejected)} claimed success(es) rejected</strong>: '
                   "adversarial examples an attack reported that failed re-verification (outside the threat model, "
                   "outside [0, 1], or not misclassified) were not counted.</div>")
    return "\n".join(out)


def _results(run: dict[str, Any], summary: dict[str, Any]) -> str:
    n = summary.get("done", summary.get("n", run["n"]))
    clean, robust = summary.get("clean_accuracy"), summary.get("robust_accuracy")
    head = (
        '<div class="headline">'
        f'<div class="metric"><div class="value">{format_percent(clean)}</div><div class="label">clean accuracy'
        f'<br>{_e(ci_text(clean, n))}</div></div>'
        f'<div class="metric"><div class="value">{format_percent(robust)}</div><div class="label">robust accuracy at '
        f'{_e(norm_name(_threat(summary)[0]))} ε = {_e(format_eps(*_threat(summary)))}<br>{_e(ci_text(robust, n))}'
        "</div></div></div>"
    )
    targeted = {a["index"]: a.get("targeted") for a in run.get("attacks", [])}
    rows = [
        "<tr><td>—</td><td>clean (no attack)</td><td></td><td></td><td></td>"
        f'<td class="num">{format_percent(clean)}</td><td class="num"></td><td class="num"></td>'
        '<td class="num"></td><td class="num"></td></tr>'
    ]
    norm, eps = _threat(summary)
    for a in summary.get("attacks") or []:
        params = a.get("params")
        shown = _shown_params(a.get("name"), params, norm, eps, bool(targeted.get(a.get("index"))))
        rows.append(
            f"<tr><td class=\"num\">{_e(a.get('index'))}</td><td><strong>{_e(a.get('name'))}</strong></td>"
            f"<td><code>{_e(_params_text(shown) if shown is not None else '')}</code></td>"
            f"<td>{_e(a.get('kind', 'white-box'))}</td><td>{'yes' if targeted.get(a.get('index')) else 'no'}</td>"
            f'<td class="num">{format_percent(a.get("robust_accuracy"))}</td>'
            f'<td class="num">{_int(a.get("broken"))}</td><td class="num">{_seconds(a.get("seconds"))}</td>'
            f'<td class="num">{_int(a.get("gradients"))}</td><td class="num">{_int(a.get("forwards"))}</td></tr>'
        )
    table = (
        '<div class="scroll"><table><tr><th>#</th><th>attack</th><th>parameters</th><th>threat model</th><th>targeted</th>'
        '<th class="num">robust accuracy after it</th><th class="num">samples it broke first</th>'
        '<th class="num">seconds</th><th class="num">input gradients</th><th class="num">forward passes</th></tr>'
        + "".join(rows) + "</table></div>"
        '<p class="muted">Parameters that do not apply under this threat model are not listed; a step size left '
        "to the attack is shown as the value it took.</p>"
        '<p class="muted">Attacks run in order as a worst-case ensemble: each attacks only the samples still robust '
        "after the previous ones. The reported robust accuracy is the per-sample worst case over everything the run "
        "computed inside the ball: the ensemble, and the steps curve and smaller epsilons of the epsilon curve.</p>"
        + _ensemble_note(summary)
        + _non_adaptive_table(summary)
    )
    return "<h2>Results</h2>" + head + table


def _shown_params(name: Any, params: Any, norm: str, eps: float, targeted: bool) -> dict[str, Any] | None:
    """An attack's parameters as the report lists them (``Attack.shown_params``: those that apply
    under the threat model, derived values instead of None); an attack this robustlab cannot rebuild
    (renamed, removed) shows its stored parameters without the None ones."""
    from robustlab.attacks import create_attack
    from robustlab.threat import ThreatModel

    if not isinstance(params, dict):
        return params
    try:
        return create_attack(str(name), ThreatModel(norm, eps), targeted=targeted, **params).shown_params()
    except Exception:  # noqa: BLE001  (whatever a stale record does, the report still shows it)
        return {k: v for k, v in params.items() if v is not None}


def _params_text(params: dict[str, Any]) -> str:
    """``steps=10, alpha=0.007843, loss=ce``: compact and wrappable (not JSON)."""
    return ", ".join(f"{k}={_json_text(v) if isinstance(v, (dict, list)) else v}" for k, v in params.items())


def _non_adaptive_table(summary: dict[str, Any]) -> str:
    """A defended model: the adaptive number beside what non-adaptive attacks give (what the defense's
    authors would have printed); the reported robust accuracy is the worst case over all of them."""
    naive = summary.get("non_adaptive")
    if not naive:
        return ""
    rows = [("adaptive attacks (the ensemble above: BPDA / EOT as the defenses declare)", summary.get("ensemble_robust_accuracy")),
            ("non-adaptive: the same attacks on the defended model as if it were a plain one", naive.get("robust_accuracy")),
            ("non-adaptive: transferred from the undefended model", naive.get("transfer_robust_accuracy")),
            ("reported: the per-sample worst case over all of them", summary.get("robust_accuracy"))]
    body = "".join(f'<tr><td>{_e(what)}</td><td class="num">{format_percent(v)}</td></tr>' for what, v in rows if v is not None)
    return ('<h3>Defended model: adaptive and non-adaptive attacks</h3><div class="scroll"><table>'
            '<tr><th>evaluation</th><th class="num">robust accuracy</th></tr>' + body + "</table></div>"
            '<p class="muted">Only the worst case counts; a non-adaptive number well above it means the defense masks '
            "gradients from attackers who ignore it (see the adaptive-gap and non-adaptive-gradients checks).</p>")


def _ensemble_note(summary: dict[str, Any]) -> str:
    ensemble, robust = summary.get("ensemble_robust_accuracy"), summary.get("robust_accuracy")
    if ensemble is None or robust is None or ensemble == robust:
        return ""
    return (f'<div class="banner warn"><strong>The ensemble alone left {format_percent(ensemble)} robust</strong>; '
            f"other attack settings of this run broke more points, so the reported robust accuracy is "
            f"{format_percent(robust)}. Strengthen the ensemble (see the worst-case check).</div>")


def _tasks_table(stats: list[dict[str, Any]], norm: str) -> str:
    if not stats:
        return "<p>No tasks were declared yet.</p>"
    rows = []
    for t in stats:
        rows.append(
            f"<tr><td><code>{_e(t['task'])}</code></td><td>{_e(t['kind'])}</td>"
            f"<td class=\"num\">{_e(format_eps(t.get('norm', norm), t['eps']))}</td>"
            f"<td class=\"num\">{_int(t.get('steps'))}</td><td class=\"num\">{_int(t['done'])} / {_int(t['n'])}</td>"
            f"<td class=\"num\">{format_percent(t['clean_accuracy'])}</td>"
            f"<td class=\"num\">{format_percent(t['robust_accuracy'])}</td><td class=\"num\">{_int(t['rejected'])}</td></tr>"
        )
    return (
        '<div class="scroll"><table><tr><th>task</th><th>kind</th><th class="num">ε</th><th class="num">steps</th>'
        "<th class=\"num\">samples done / n</th><th class=\"num\">clean acc.</th><th class=\"num\">robust acc.</th>"
        "<th class=\"num\">rejected</th></tr>" + "".join(rows) + "</table></div>"
    )


def _curves(summary: dict[str, Any], norm: str) -> str:
    parts = ["<h2>Curves</h2>"]
    curve = summary.get("eps_curve") or []
    # Two points (clean and the run's epsilon) are no curve: none is drawn, unless minimum-norm
    # distances give one.
    if len(curve) > 2 or (curve and (summary.get("min_norm") or {}).get("curve")):
        parts.append(_img(plot_eps_curve(summary), "robust accuracy against epsilon"))
        pts = "".join(
            f'<tr><td class="num">{_e(format_eps(norm, p["eps"]))}</td>'
            f'<td class="num">{format_percent(p.get("robust_accuracy"))}</td></tr>'
            for p in summary["eps_curve"]
        )
        parts.append('<table><tr><th class="num">ε</th><th class="num">robust accuracy</th></tr>' + pts + "</table>")
    else:
        parts.append("<p>No epsilon curve: the run measured clean accuracy and its own ε only (give --eps-grid "
                     "for a curve).</p>" if curve else "<p>No epsilon curve was recorded for this run.</p>")
    mn = summary.get("min_norm")
    if mn:
        full = mn.get("eps_for_full_success")
        median = f"{mn['median']:.4g}" if mn.get("median") is not None else "—"
        ending = f"every point breaks at ε = {full:.4g}." if full is not None else "some points were never broken."
        parts.append(
            f"<p>Minimum-norm attacks ({_e(', '.join(mn['attacks']))}) found a misclassifying perturbation for "
            f"{_int(mn['found'])} of {_int(mn['attacked'])} attacked samples; median norm {_e(median)}; {_e(ending)} "
            "The dotted curve in the plot is accuracy against budget from these distances (one run).</p>"
        )
    steps = summary.get("steps_curve")
    if steps and steps.get("points"):
        parts.append(_img(plot_steps_curve(summary), "robust accuracy against attack iterations"))
        parts.append('<p class="muted">More iterations should not help the model: a curve still falling at the right '
                     "edge means the attack had not converged and the robust accuracy is an overestimate.</p>")
    else:
        parts.append("<p>No steps curve was recorded for this run.</p>")
    return "\n".join(parts)


def _checks(checks: list[dict[str, Any]], partial: bool) -> str:
    if not checks:
        note = "not run yet (the run is incomplete)" if partial else "none were recorded"
        return f"<h2>Sanity checks</h2><p>Sanity checks: {note}.</p>"
    counts = {s: sum(1 for c in checks if str(c.get("status")) == s) for s in _STATUS_CLASSES}
    rows = []
    for c in checks:
        status = str(c.get("status"))
        cls = status if status in _STATUS_CLASSES else "unknown"
        detail = c.get("detail")
        detail_html = _value_html(detail) if not isinstance(detail, str) else _e(detail)
        rows.append(f'<tr class="check-{cls}"><td>{_e(c.get("name"))}</td>'
                    f'<td><span class="badge {cls}">{_e(status)}</span></td><td>{detail_html}</td></tr>')
    summary = ", ".join(f"{counts[s]} {s}" for s in _STATUS_CLASSES)
    return ("<h2>Sanity checks</h2>"
            f"<p>{_e(summary)}. These checks look for signs of gradient masking and broken evaluations.</p>"
            "<table><tr><th>check</th><th>verdict</th><th>detail</th></tr>" + "".join(rows) + "</table>")


def _model_notes(run: dict[str, Any]) -> str:
    info = run.get("model_info") or {}
    forced = info.get("eval_mode_forced") or []
    items: list[tuple[str, str]] = [
        ("Source", _e(info.get("source"))),
        ("Eval mode", (f"forced for {len(forced)} submodule(s) that were in train mode: <code>"
                       f"{_e(', '.join(map(str, forced)))}</code>") if forced else "model was already in eval mode"),
        ("Randomized", ("<strong>yes</strong>: output changes between identical calls; an EOT evaluation is needed"
                        if info.get("randomized") else
                        "no: predictions are deterministic; only the attacker's view draws random numbers "
                        f"({_e(', '.join(map(str, info['attack_randomized'])))}: gradients averaged over draws)"
                        if info.get("attack_randomized") else "no")),
    ]
    for key, value in info.items():
        if key not in ("card", "source", "eval_mode_forced", "randomized", "attack_randomized"):
            items.append((key, _value_html(value)))
    parts = ["<h2>Model notes</h2>", _kv_table(items, raw=True)]
    card = info.get("card")
    if isinstance(card, dict) and card:
        parts.append("<h3>Model card</h3>")
        parts.append(_kv_table([(k, _value_html(v)) for k, v in card.items()], raw=True))
    else:
        parts.append('<p class="muted">No model card.</p>')
    return "\n".join(parts)


def _environment(run: dict[str, Any]) -> str:
    env = run.get("environment") or {}
    config = run.get("config") or {}
    return (
        "<h2>Environment</h2>"
        + (_kv_table([(k, _value_html(v)) for k, v in env.items()], raw=True) if env else "<p>Not recorded.</p>")
        + "<details><summary>Full configuration (JSON)</summary><pre>"
        + _e(json.dumps(config, indent=2, sort_keys=True, default=str))
        + "</pre></details>"
    )


def _gallery(examples: list[Any], classes: Sequence[str] | None) -> str:
    if not examples:
        return "<h2>Adversarial examples</h2><p>No adversarial examples were stored for this run.</p>"
    return ("<h2>Adversarial examples</h2>"
            f'<p class="muted">{len(examples)} verified adversarial examples from the main evaluation. Columns: clean '
            "image with its true label, adversarial image with the model's prediction, and the perturbation "
            "amplified to the full range (mid-gray = unchanged).</p>"
            + _img(plot_gallery(examples, classes), "adversarial examples"))


# ---------------------------------------------------------------------- files

def write_summary_json(path: Path, info: dict[str, Any], summary: dict[str, Any], checks: list[dict[str, Any]],
                       partial: bool, **extra: Any) -> Path:
    """A run's ``summary.json`` (every protocol's report writes the same document): status, summary,
    checks, configuration, environment and model info, plus ``extra`` keys."""
    document = {"run_id": info["run_id"], "status": info.get("status"), "partial": partial,
                "created": info.get("created"), "finished": info.get("finished"), "summary": summary,
                "checks": checks, "config": info.get("config"), "environment": info.get("environment"),
                "model_info": info.get("model_info"), **extra}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_rows_csv(path: Path, rows: list[Any], with_task: bool = False) -> Path:
    """A protocol's stored per-sample rows as CSV (every column but the run and, unless ``with_task``,
    the task)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if rows:
            drop = ("run_id",) if with_task else ("run_id", "task")
            names = [k for k in rows[0].keys() if k not in drop]  # noqa: SIM118 (an sqlite3.Row)
            writer.writerow(names)
            for r in rows:
                writer.writerow(["" if r[k] is None else r[k] for k in names])
    return path


def write_protocol_report(
    store: ResultsStore, info: dict[str, Any], out: Path, title: str,
    body: Callable[[dict[str, Any], dict[str, Any], list[Any], bool], list[str]], *, all_tasks: bool = False,
) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` of a run whose protocol keeps its rows in
    the task ``main`` (certified, verified, detection, segmentation), or with ``all_tasks`` in every
    task of the run in order (structured: one task per threat model; the CSV then has a task column):
    the summary from the store for an unfinished run, ``body(run, summary, rows, partial)`` the page's
    own sections, then the checks, model notes and environment every page shows. ``title``: e.g.
    "robustlab certification"."""
    run_id = info["run_id"]
    protocol = protocol_class(info["protocol"])
    partial = info.get("summary") is None
    summary = protocol.summarize(store, info) if partial else info["summary"]
    checks = info.get("checks") or []
    tasks = [t["task"] for t in info["tasks"]] if all_tasks else ["main"]
    rows = [r for task in tasks for r in store.sample_rows(protocol.sample_table, run_id, task)]
    sections = [*body(info, summary, rows, partial), _checks(checks, partial), _model_notes(info), _environment(info)]
    html_path = out / "report.html"
    html_path.write_text(wrap_page(f"{title}: {info['model']} ({run_id})", sections, store), encoding="utf-8")
    return {"html": html_path, "summary": write_summary_json(out / "summary.json", info, summary, checks, partial),
            "samples": write_rows_csv(out / "samples.csv", rows, with_task=all_tasks)}


def wrap_page(title: str, body: list[str], store: ResultsStore) -> str:
    """The whole HTML document around the sections of ``body`` (inline CSS, footer)."""
    try:
        from robustlab import __version__ as version
    except ImportError:  # pragma: no cover
        version = "?"
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + f"\n<footer>Generated by robustlab {_e(version)} on {_e(generated)} from results store "
        f"<code>{_e(store.path.name)}</code>.</footer>\n</body></html>\n"
    )


# protocol -> the module whose ``write_<module>_report(store, info, out)`` writes its page (the
# adversarial page is write_report's own); imported when a run of that protocol is reported
PAGES = {"certified": "certified", "corruption": "corruption", "detection": "detection",
         "segmentation": "segmentation", "structured": "structured", "verified": "verified", "zero-shot": "zero_shot"}


def _protocol_page(protocol: str) -> Callable[[ResultsStore, dict[str, Any], Path], dict[str, Path]]:
    import importlib

    module = PAGES[protocol]
    return getattr(importlib.import_module(f"robustlab.report.{module}"), f"write_{module}_report")


def _write_samples_csv(path: Path, rows: list[SampleRow], attack_names: dict[int, str]) -> None:
    names = [f.name for f in fields(SampleRow)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(names + ["broken_by_attack"])
        for r in rows:
            d = asdict(r)
            values = []
            for name in names:
                v = d[name]
                values.append("" if v is None else (int(v) if isinstance(v, bool) else v))
            values.append(attack_names.get(r.broken_by, "") if r.broken_by is not None else "")
            writer.writerow(values)


def write_report(store: ResultsStore, run: str, out_dir: str | Path, *, gallery_size: int = 12) -> dict[str, Path]:
    """Write the report of one run into ``out_dir`` (created if missing).

    ``run``: a run id, a unique prefix of one, or ``latest``. Writes ``report.html`` (one self-contained
    page), ``summary.json`` (summary, sanity checks, configuration, environment, model info) and
    ``samples.csv`` (one row per sample of the main evaluation, with a header). A run that has no summary
    yet gets a partial report built from the samples done so far, clearly marked as such.

    Returns ``{"html": ..., "summary": ..., "samples": ...}``, the paths written.
    """
    info = store.get_run(run)
    run_id = info["run_id"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if info.get("protocol") in PAGES:  # runs of other protocols have their own page
        return _protocol_page(info["protocol"])(store, info, out)

    rows = store.samples(run_id, "main")
    partial = info.get("summary") is None
    summary = protocol_class(info["protocol"]).summarize(store, info) if partial else info["summary"]
    checks = info.get("checks") or []
    config = info.get("config") or {}
    classes = config.get("classes") if isinstance(config.get("classes"), list) else None
    stats = _task_stats(store, info)
    examples = store.examples(run_id, "main", gallery_size) if gallery_size > 0 else []

    body = [
        _header(info, summary, partial),
        _warnings(info, summary, checks),
        _results(info, summary),
        _curves(summary, _threat(summary)[0]),
        _checks(checks, partial or info.get("status") != "complete"),
        _model_notes(info),
        _environment(info),
        _gallery(examples, classes),
        "<h2>Tasks</h2>" + _tasks_table(stats, _threat(summary)[0]),
    ]
    page = wrap_page(f"robustlab report: {info['model']} ({run_id})", body, store)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")

    summary_path = out / "summary.json"
    document = {
        "run_id": run_id, "status": info.get("status"), "partial": partial, "created": info.get("created"),
        "finished": info.get("finished"), "summary": summary, "checks": checks, "config": config,
        "environment": info.get("environment"), "model_info": info.get("model_info"), "attacks": info.get("attacks"),
    }
    summary_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")

    samples_path = out / "samples.csv"
    _write_samples_csv(samples_path, rows, {a["index"]: a["name"] for a in info.get("attacks", [])})
    return {"html": html_path, "summary": summary_path, "samples": samples_path}
