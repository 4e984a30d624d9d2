"""Reports of a segmentation run (``robustlab.eval.protocols.segmentation``): the text summary
``robustlab eval`` prints and the HTML page ``robustlab report`` writes (mIoU and pixel accuracy,
clean and robust; IoU per class; mIoU against epsilon; what each attack did), with ``summary.json``
and ``samples.csv`` (one row per sample of the main task)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robustlab.report.plots import _figure, _png, format_percent


def format_segmentation_summary(s: dict[str, Any], checks: list[dict[str, str]]) -> str:
    """The lines ``robustlab eval`` prints for a segmentation run."""
    threat = s["threat"]
    lines = [f"{s['model']} on {s['dataset']}:{s['split']} (n={s['n']}), segmentation, {threat['norm']} eps={threat['eps']:g}",
             f"  mIoU            clean {format_percent(s['clean_miou'])}   robust {format_percent(s['robust_miou'])}",
             (f"  pixel accuracy  clean {format_percent(s['clean_pixel_accuracy'])}   robust "
             f"{format_percent(s['robust_pixel_accuracy'])}")]
    for a in s["attacks"]:
        lines.append(f"  attack {a['index']} {a['name']}: worst case for {a['worst_for']} samples, {a['seconds']:.1f}s, "
                     f"{a['gradients']} gradients")
    curve = [p for p in s.get("eps_curve") or [] if p["eps"] not in (0.0, threat["eps"])]
    for p in curve:
        lines.append(f"  eps={p['eps']:g}: mIoU {format_percent(p['mean_iou'])}, pixel accuracy "
                     f"{format_percent(p['pixel_accuracy'])}")
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def plot_miou_curve(curve: list[dict[str, Any]], norm: str, title: str) -> bytes:
    """mIoU and pixel accuracy against epsilon (a PNG)."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    eps = [p["eps"] for p in curve]
    ax.plot(eps, [100 * (p["mean_iou"] or 0) for p in curve], "o-", label="mIoU")
    ax.plot(eps, [100 * (p["pixel_accuracy"] or 0) for p in curve], "s--", label="pixel accuracy")
    ax.set_xlabel(f"{norm} epsilon")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def write_segmentation_report(store: Any, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` of a segmentation run into ``out``."""
    from robustlab.report import html as page

    return page.write_protocol_report(store, info, out, "robustlab segmentation",
                                      lambda run, s, rows, partial: _body(run, s, partial))


def _body(run: dict[str, Any], s: dict[str, Any], partial: bool) -> list[str]:
    from robustlab.report import html as page

    threat = s["threat"]
    parts = [f"<h1>Segmentation report: {page._e(run['model'])}</h1>",
             (f'<p class="sub">{page._e(run["dataset"])} / {page._e(run["split"])}, n = {page._int(s["n"])} · '
             f"{page._e(threat['norm'])} eps = {threat['eps']:g} · run <code>{page._e(run['run_id'])}</code></p>")]
    if partial or run.get("status") != "complete":
        parts.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(run.get("status"))}).'
                     f"</strong> {page._int(s['n'])} of {page._int(run['n'])} samples are done so far.</div>")
    parts.append(page._kv_table([
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"), ("Samples (n)", s["n"]),
        ("Classes", s["num_classes"]), ("Threat model", f"{threat['norm']} ball of radius {threat['eps']:g} in [0, 1]"),
        ("Attacks", ", ".join(a["name"] for a in s["attacks"])), ("Seed", run["seed"]), ("Status", run.get("status")),
        ("Run id", run["run_id"]), ("Time attacking (s)", f"{float(s.get('seconds') or 0):,.1f}"),
    ]))
    metrics = [("clean mIoU", s["clean_miou"]), ("robust mIoU", s["robust_miou"]),
               ("clean pixel accuracy", s["clean_pixel_accuracy"]), ("robust pixel accuracy", s["robust_pixel_accuracy"])]
    parts.append("<h2>Mean IoU and pixel accuracy</h2><div class=\"headline\">" + "".join(
        f'<div class="metric"><div class="value">{format_percent(v)}</div><div class="label">{page._e(label)}</div></div>'
        for label, v in metrics) + "</div>"
        '<p class="muted">Every sample is attacked by each attack, which maximizes the per-pixel cross-entropy '
        "averaged over all pixels; per sample the robust numbers count the attack image with the fewest correctly "
        "labelled pixels. IoU of a class = pixels predicted and labelled with it / pixels predicted or labelled "
        "with it, over the whole split; mIoU = the mean over the classes that occur.</p>")
    classes = s.get("classes") or [str(i) for i in range(s["num_classes"])]
    table = "".join(f"<tr><td>{page._e(c)}</td><td class=\"num\">{format_percent(a)}</td>"
                    f"<td class=\"num\">{format_percent(b)}</td></tr>"
                    for c, a, b in zip(classes, s.get("clean_iou") or [], s.get("robust_iou") or []))
    parts.append('<h2>IoU per class</h2><table><tr><th>class</th><th class="num">clean</th>'
                 f'<th class="num">robust</th></tr>{table}</table>')
    curve = s.get("eps_curve") or []
    if len(curve) > 1:
        parts.append("<h2>Against epsilon</h2>" + page._img(plot_miou_curve(curve, threat["norm"], run["model"]),
                                                             "mIoU against epsilon"))
    rows = "".join(f"<tr><td>{a['index']}</td><td>{page._e(a['name'])}</td><td><code>{page._e(json.dumps(a['params']))}"
                   f"</code></td><td class=\"num\">{page._int(a['worst_for'])}</td><td class=\"num\">"
                   f"{page._int(a['gradients'])}</td><td class=\"num\">{a['seconds']:.1f}</td></tr>" for a in s["attacks"])
    parts.append('<h2>Attacks</h2><table><tr><th>#</th><th>attack</th><th>parameters</th><th class="num">worst case '
                 'for samples</th><th class="num">gradients</th><th class="num">seconds</th></tr>' + rows + "</table>"
                 f"<p class=\"muted\">{page._int(s.get('rejected'))} attack images outside the ball or [0, 1] were "
                 "replaced by the clean image.</p>")
    return parts
