"""The report of a corruption run: a per-corruption table (error per severity, mean, CE, relative CE),
an error-vs-severity plot, and a gallery of one image under every corruption. Everything comes from
the protocol's summary and the examples it stored (the first image of each task)."""

from __future__ import annotations

import base64
import csv
import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.eval.protocols import protocol_class
from robustlab.eval.store import ResultsStore
from robustlab.report.html import write_summary_json
from robustlab.report.plots import (
    _DPI,
    _figure,
    _hwc,
    _message_png,
    _png,
    _upscale,
    format_percent,
)


def _severities(summary: dict[str, Any]) -> list[int]:
    return sorted({int(s) for per in summary["per_corruption"] for s in per["errors"]})


def corruption_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The table: one row per corruption (errors per severity in %, mean, CE and relative CE in %),
    then the mean over corruptions."""
    levels = _severities(summary)
    rows = []
    for per in summary["per_corruption"]:
        errs = [format_percent(per["errors"].get(str(s)), 1) for s in levels]
        rows.append([per["corruption"], *errs, format_percent(per["mean_error"], 1), format_percent(per["ce"], 1),
                     format_percent(per["relative_ce"], 1)])
    rows.append(["mean", *[""] * len(levels), format_percent(summary["mean_corruption_error"], 1),
                 format_percent(summary.get("mce"), 1), format_percent(summary.get("relative_mce"), 1)])
    return rows


def table_header(summary: dict[str, Any]) -> list[str]:
    return ["corruption", *[f"s{s}" for s in _severities(summary)], "mean error", "CE", "rel. CE"]


def format_corruption_summary(s: dict[str, Any]) -> str:
    """The lines ``robustlab corrupt`` prints: clean accuracy, the per-corruption table, mCE."""
    lines = [f"{s['model']} on {s['dataset']}:{s['split']} (n={s['n']}), {len(s['per_corruption'])} corruptions",
             f"  clean error {format_percent(s['clean_error'])}   (accuracy {format_percent(s['clean_accuracy'])})"]
    header = table_header(s)
    rows = corruption_rows(s)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    base = s.get("baseline")
    if base:
        lines.append(f"  mCE {format_percent(s['mce'])}, relative mCE {format_percent(s['relative_mce'])} "
                     f"(baseline: {base})")
    else:
        lines.append(f"  mean corruption error {format_percent(s['mean_corruption_error'])} (no baseline: no CE)")
    return "\n".join(lines)


def plot_error_vs_severity(summary: dict[str, Any]) -> bytes:
    """Error (%) against severity, one line per corruption (a corruption with one level is a dot), the
    clean error as a dashed line."""
    per = summary["per_corruption"]
    if not per:
        return _message_png("Error vs severity", "no corrupted task has results yet")
    fig = _figure(7.6, 4.6)
    ax = fig.add_axes((0.09, 0.12, 0.6, 0.78))
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    for k, p in enumerate(per):
        pts = sorted((int(s), 100 * e) for s, e in p["errors"].items())
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=4, lw=1.4, color=cmap(k % 20),
                label=p["corruption"])
    if summary.get("clean_error") is not None:
        ax.axhline(100 * summary["clean_error"], ls="--", color="#333333", lw=1, label="clean")
    ax.set_xlabel("severity", fontsize=11)
    ax.set_ylabel("error (%)", fontsize=11)
    ax.set_xticks(_severities(summary))
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.35)
    ax.set_title(f"{summary['model']} on {summary['dataset']}: error vs severity", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def plot_corruption_gallery(tiles: list[tuple[str, np.ndarray]]) -> bytes:
    """One image under every corruption: ``tiles`` (title, image (C, H, W) in [0, 1]), the clean image
    first; nearest-neighbour enlarged so each pixel shows."""
    if not tiles:
        return _message_png("Gallery", "no images were stored for this run")
    images = [_hwc(img) for _, img in tiles]
    h = max(i[0].shape[0] for i in images)
    w = max(i[0].shape[1] for i in images)
    factor = max(1, math.ceil(96 / max(h, w)))
    th, tw = h * factor, w * factor
    per_row = min(len(tiles), 6)
    rows = math.ceil(len(tiles) / per_row)
    gap, head = 12, 18
    fig_w, fig_h = per_row * (tw + gap) + gap, rows * (th + head + gap) + gap
    canvas = np.ones((fig_h, fig_w, 3), dtype=np.float32)
    labels = []
    for k, ((title, _), (img, gray)) in enumerate(zip(tiles, images)):
        r, c = divmod(k, per_row)
        y, x = gap + r * (th + head + gap) + head, gap + c * (tw + gap)
        big = _upscale(np.clip(img, 0, 1), factor)
        if big.ndim == 2:
            big = np.repeat(big[:, :, None], 3, axis=2)
        canvas[y - 1:y + big.shape[0] + 1, x - 1:x + big.shape[1] + 1] = 0.55
        canvas[y:y + big.shape[0], x:x + big.shape[1]] = big
        labels.append((x, y - 3, title))
    fig = _figure(fig_w / _DPI, fig_h / _DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(canvas, interpolation="nearest", extent=(0, fig_w, fig_h, 0), aspect="auto")
    for x, y, text in labels:
        ax.text(x, y, text if len(text) <= 22 else text[:21] + "…", ha="left", va="bottom", fontsize=7.5)
    return _png(fig)


def gallery_tiles(store: ResultsStore, run: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """The stored first image of each task: the clean one, then each corruption at its middle severity."""
    by_corruption: dict[str, list[dict[str, Any]]] = {}
    for t in run["tasks"]:
        by_corruption.setdefault(t["corruption"], []).append(t)
    tiles = []
    for corruption, tasks in by_corruption.items():
        t = tasks[len(tasks) // 2]
        found = store.examples(run["run_id"], t["task"], 1)
        if found:
            image = found[0].clean if corruption == "clean" else found[0].adv
            tiles.append((t["task"], image))
    return tiles


def write_corruption_report(store: ResultsStore, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html`` (table, plot, gallery), ``summary.json`` and ``samples.csv`` (one row per task
    and sample) of one corruption run."""
    partial = info.get("summary") is None
    summary = protocol_class(info["protocol"]).summarize(store, info) if partial else info["summary"]
    header = table_header(summary)
    rows = corruption_rows(summary)

    def img(png: bytes, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    base = summary.get("baseline")
    headline = (f"mCE {format_percent(summary.get('mce'))}, relative mCE {format_percent(summary.get('relative_mce'))}"
                f" against {html.escape(str(base))}" if base else
                f"mean corruption error {format_percent(summary['mean_corruption_error'])} (no baseline)")
    body = [
        f"<h1>Corruption robustness: {html.escape(str(info['model']))}</h1>",
        (f"<p>{html.escape(info['dataset'])}:{html.escape(info['split'])}, n = {info['n']}, seed {info['seed']}, run "
        f"<code>{info['run_id']}</code>{' — <strong>partial</strong>' if partial else ''}</p>"),
        (f"<p>Clean error {format_percent(summary['clean_error'])}; {headline}. CE_c = Σ_s E_s,c / Σ_s E^base_s,c; "
        "relative CE subtracts each model's clean error first (Hendrycks &amp; Dietterich, 2019).</p>"),
        "<h2>Per corruption</h2>", table,
        "<h2>Error vs severity</h2>", img(plot_error_vs_severity(summary), "error vs severity"),
        "<h2>Gallery</h2>", img(plot_corruption_gallery(gallery_tiles(store, info)), "one image under every corruption"),
    ]
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>robustlab corruption report</title>'
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>"
            "</head><body>\n" + "\n".join(body) + f"\n<footer>Generated {generated}.</footer></body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    html_path, summary_path = out / "report.html", out / "summary.json"
    html_path.write_text(page, encoding="utf-8")
    write_summary_json(summary_path, info, summary, info.get("checks") or [], partial)
    samples_path = out / "samples.csv"
    with open(samples_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "corruption", "severity", "sample_index", "label", "prediction", "correct"])
        for t in info["tasks"]:
            for r in store.sample_rows("corruption_samples", info["run_id"], t["task"]):
                writer.writerow([t["task"], t["corruption"], t["severity"], r["sample_index"], r["label"],
                                 r["prediction"], r["correct"]])
    return {"html": html_path, "summary": summary_path, "samples": samples_path}
