"""Reports of a zero-shot run (``robustlab.eval.protocols.zero_shot``): the text table
``robustlab zeroshot`` prints and the HTML page ``robustlab report`` writes (one table: a row per data
set and the average, clean and robust accuracy at each epsilon; a bar chart; adversarial examples per
data set)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from robustlab.report.plots import format_percent


def _keys(s: dict[str, Any]) -> list[str]:
    return list(s.get("average_robust_accuracy") or {})


def table_rows(s: dict[str, Any]) -> list[list[str]]:
    """Header, one row per data set, the average: data set, n, clean, robust per epsilon."""
    keys = _keys(s)
    rows = [["data set", "n", "clean", *[f"robust {k}" for k in keys]]]
    for d in s["datasets"]:
        n = f"{d['n']}" if d["n"] >= d["of"] else f"{d['n']} of {d['of']}"
        rows.append([d["dataset"], n, format_percent(d["clean_accuracy"]),
                     *[format_percent(d["robust_accuracy"].get(k)) for k in keys]])
    rows.append([f"average ({len(s['datasets'])} data sets)", str(s["n"]), format_percent(s["average_clean_accuracy"]),
                 *[format_percent(s["average_robust_accuracy"].get(k)) for k in keys]])
    return rows


def format_zero_shot(s: dict[str, Any], checks: list[dict[str, str]]) -> str:
    """The lines ``robustlab zeroshot`` prints: the model, threat and attacks, the table, the checks."""
    attacks = "+".join(a["name"] + (f"-{a['params']['steps']}" if "steps" in a["params"] else "") for a in s["attacks"])
    lines = [f"{s['model']}: zero-shot, {s['threat']['norm']} eps {', '.join(_keys(s))}, attacks {attacks}"]
    rows = table_rows(s)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        if j == len(rows) - 1:
            lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if s.get("partial"):
        lines.append("  (incomplete: numbers over the samples done so far)")
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def plot_zero_shot(s: dict[str, Any]) -> bytes:
    """Grouped bars: per data set (and the average) clean accuracy and robust accuracy at each epsilon."""
    from robustlab.report.plots import _figure, _png

    keys = _keys(s)
    names = [d["dataset"] for d in s["datasets"]] + ["average"]
    series = [("clean", [d["clean_accuracy"] for d in s["datasets"]] + [s["average_clean_accuracy"]])]
    series += [(f"robust {k}", [d["robust_accuracy"].get(k) for d in s["datasets"]] + [s["average_robust_accuracy"][k]])
               for k in keys]
    fig = _figure(max(5.0, 1.1 * len(names) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * (v or 0.0) for v in values], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("zero-shot accuracy per data set")
    return _png(fig)


def write_zero_shot_report(store: Any, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` (every data set's rows) of a zero-shot run."""
    from robustlab.eval.protocols import protocol_class
    from robustlab.report import html as page
    from robustlab.report.plots import plot_gallery

    run_id = info["run_id"]
    partial = info.get("summary") is None
    protocol = protocol_class(info["protocol"])
    s = protocol.summarize(store, info) if partial else info["summary"]
    checks = info.get("checks") or []
    config = info.get("config") or {}
    rows = table_rows(s)
    table = ("<table><tr>" + "".join(f"<th>{page._e(h)}</th>" for h in rows[0]) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{page._e(c)}</td>" for c in r) + "</tr>" for r in rows[1:-1])
             + "<tr>" + "".join(f"<td><strong>{page._e(c)}</strong></td>" for c in rows[-1]) + "</tr></table>")
    attacks = ", ".join(f"{a['name']} ({page._params_text(a['params'])})" for a in s["attacks"])
    body = [f"<h1>Zero-shot robustness report: {page._e(info['model'])}</h1>",
            (f'<p class="sub">{len(s["datasets"])} data sets · {page._e(s["threat"]["norm"])} eps '
            f"{page._e(', '.join(_keys(s)))} · run <code>{page._e(run_id)}</code></p>")]
    if partial or info.get("status") != "complete":
        body.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(info.get("status"))}).'
                    "</strong> Numbers are over the samples done so far.</div>")
    body += [
        page._kv_table([("Model", info["model"]), ("Attacks", attacks), ("Seed", info["seed"]),
                        ("Status", info.get("status")), ("Run id", run_id)]),
        "<h2>Clean and robust zero-shot accuracy</h2>", table,
        ('<p class="muted">Each data set is classified zero-shot: its class names in every prompt template, '
        "encoded by the text tower and averaged, against the image embedding. Images are perturbed in [0, 1] "
        "pixels before the model's resize and normalization; every counted adversarial example is re-verified. "
        "The average weighs every data set equally.</p>"),
        page._img(plot_zero_shot(s), "zero-shot accuracy per data set"),
        "<h2>Prompts</h2>" + page._kv_table(
            [(d["dataset"], (f"{len(d['classnames'])} classes ({', '.join(d['classnames'][:5])}"
              f"{', ...' if len(d['classnames']) > 5 else ''}); {len(d['templates'])} templates "
              f"({d['templates'][0]!r}, ...); from {d.get('source', '')}")) for d in config.get("datasets", [])]),
        page._checks(checks, partial or info.get("status") != "complete"), page._model_notes(info),
        page._environment(info),
    ]
    for t in info.get("tasks", []):
        examples = store.examples(run_id, t["task"], 4)
        if examples:
            classes = next((d["classnames"] for d in config.get("datasets", []) if d["dataset"] == t.get("dataset")), None)
            body.append(f"<h3>Adversarial examples: {page._e(t['task'])}</h3>"
                        + page._img(plot_gallery(examples, classes), f"adversarial examples of {t['task']}"))
    html_path = out / "report.html"
    html_path.write_text(page.wrap_page(f"robustlab zero-shot: {info['model']} ({run_id})", body, store),
                         encoding="utf-8")
    summary_path = page.write_summary_json(out / "summary.json", info, s, checks, partial)
    samples_path = out / "samples.csv"
    columns = ["task", "sample_index", *[c for c, _ in protocol.sample_columns]]
    with samples_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for t in info.get("tasks", []):
            for r in store.sample_rows(protocol.sample_table, run_id, t["task"]):
                writer.writerow([t["task"], *["" if r[c] is None else r[c] for c in columns[1:]]])
    return {"html": html_path, "summary": summary_path, "samples": samples_path}
