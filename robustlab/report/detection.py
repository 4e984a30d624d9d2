"""Reports of a detection run (``robustlab.eval.protocols.detection``): the text summary ``robustlab
detect`` prints and the HTML page ``robustlab report`` writes (operating point, robust accuracy of
classifier + detector under plain PGD and the adaptive attack side by side, ROC curves, checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustlab.report.plots import _figure, _message_png, _png, ci_text, format_percent
from robustlab.threat import format_eps

_NAMES = {"pgd": "plain PGD (detector-unaware)", "adaptive": "adaptive (detector-aware)"}


def _detector_text(d: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (d.get("params") or {}).items())
    return f"{d['name']}({params})" if params else d["name"]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _auc(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def format_detection(s: dict[str, Any], checks: list[dict[str, str]], title: str) -> str:
    """The lines ``robustlab detect`` prints."""
    t = s["threat"]
    n = s["n"]
    lines = [f"{title} (n={n}), {t['norm']} eps={format_eps(t['norm'], t['eps'])}, detector {_detector_text(s['detector'])}",
             (f"  threshold {s['threshold']:.6g} at {100 * s['fpr']:g}% false positives on clean calibration images "
             f"({_pct(s['clean_flag_rate'])} of the evaluated clean images flagged)"),
             f"  clean accuracy                   {100 * s['clean_accuracy']:6.2f}%   ({ci_text(s['clean_accuracy'], n)})"]
    for key, a in s["attacks"].items():
        lines.append(f"  {_NAMES[key]:<31}  AUC {_auc(a['auc'])}, detected {_pct(a['detection_rate'])} of {a['misclassified']} "
                     f"misclassified, fooled {a['fooled']}, robust (classifier + detector) {_pct(a['robust_accuracy'])}")
    lines.append(f"  robust accuracy, worst case      {100 * s['robust_accuracy']:6.2f}%   "
                 f"({ci_text(s['robust_accuracy'], n)}; the classifier alone under PGD: "
                 f"{_pct(s['undefended_robust_accuracy'])})")
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def plot_roc(rows: list[Any], attacks: list[str], threshold: float, fpr: float) -> bytes:
    """ROC curves (detection rate against false-positive rate) of each attack's misclassified examples
    against the clean scores, with the run's operating point marked."""
    clean = sorted((r["clean_score"] for r in rows), reverse=True)
    if not clean:
        return _message_png("ROC", "no sample evaluated yet")
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for key, color in zip(attacks, ("#1f77b4", "#d62728")):
        adv = sorted((r[f"{key}_score"] for r in rows if r[f"{key}_pred"] is not None and r[f"{key}_pred"] != r["label"]),
                     reverse=True)
        if not adv:
            continue
        cuts = sorted(set(clean) | set(adv), reverse=True)
        xs, ys = [0.0], [0.0]
        for c in cuts:
            xs.append(sum(1 for v in clean if v >= c) / len(clean))
            ys.append(sum(1 for v in adv if v >= c) / len(adv))
        ax.plot(xs + [1.0], ys + [1.0], color=color, linewidth=2, label=_NAMES[key])
        ax.plot([sum(1 for v in clean if v > threshold) / len(clean)], [sum(1 for v in adv if v > threshold) / len(adv)],
                "o", color=color, markersize=7)
    ax.plot([0, 1], [0, 1], ":", color="#7f7f7f", linewidth=1)
    ax.axvline(fpr, color="#7f7f7f", linestyle="--", linewidth=1, label=f"{100 * fpr:g}% false positives (calibration)")
    ax.set_xlabel("false-positive rate (clean images flagged)")
    ax.set_ylabel("detection rate (misclassified adversarial examples flagged)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title("ROC of the detector; dots: the run's threshold", fontsize=12)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.9)
    return _png(fig)


def write_detection_report(store: Any, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` of a detection run into ``out``."""
    from robustlab.report import html as page

    return page.write_protocol_report(store, info, out, "robustlab detection", _body)


def _body(run: dict[str, Any], s: dict[str, Any], rows: list[Any], partial: bool) -> list[str]:
    from robustlab.report import html as page

    t, n, config = s["threat"], s["n"], run["config"]
    eps = format_eps(t["norm"], t["eps"])
    parts = [f"<h1>Detection report: {page._e(run['model'])}</h1>",
             (f'<p class="sub">{page._e(run["dataset"])} / {page._e(run["split"])}, n = {page._int(n)} · {page._e(t["norm"])} '
             f"eps = {page._e(eps)} · detector {page._e(_detector_text(s['detector']))} · run "
             f"<code>{page._e(run['run_id'])}</code></p>")]
    if partial or run.get("status") != "complete":
        parts.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(run.get("status"))}).'
                     f"</strong> {page._int(n)} of {page._int(run['n'])} samples are evaluated so far.</div>")
    cal, fit = config.get("calibration") or {}, config.get("fit") or {}
    adaptive = config.get("adaptive")
    parts.append(page._kv_table([
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"), ("Samples (n)", n),
        ("Detector", _detector_text(s["detector"])),
        ("Fitted on", f"{fit.get('n')} clean training images" + (" and PGD examples of them" if fit.get("adversarial") else "")
         + (f" ({fit['source']})" if fit.get("source") else "")),
        ("Threshold", (f"{s['threshold']:.6g}: {100 * s['fpr']:g}% of {cal.get('n')} clean calibration images flagged "
         f"({cal.get('source') or 'held out'}), fixed before any attack")),
        ("Plain attack", f"PGD, {config['pgd']['params']['steps']} steps, the classifier alone"),
        ("Adaptive attack", "none" if adaptive is None else "detector-aware: " + ", ".join(
            f"{k}={v}" for k, v in adaptive["params"].items())),
        ("Seed", run["seed"]), ("Status", run.get("status")), ("Run id", run["run_id"]),
    ]))
    metrics = [("clean accuracy", s["clean_accuracy"]),
               ("robust accuracy, classifier + detector (worst case)", s["robust_accuracy"]),
               ("the same under plain PGD only (non-adaptive)", s["non_adaptive"]["robust_accuracy"]),
               ("the classifier alone under PGD", s["undefended_robust_accuracy"])]
    parts.append("<h2>Robust accuracy of classifier + detector</h2><div class=\"headline\">" + "".join(
        f'<div class="metric"><div class="value">{format_percent(v)}</div><div class="label">{page._e(label)}<br>'
        f"{page._e(ci_text(v, n))}</div></div>" for label, v in metrics) + "</div>"
        '<p class="muted">An attack succeeds on a point when it finds an input inside the threat model that the '
        "classifier misclassifies and the detector does not flag at the threshold. A point counts as robust when it "
        "is classified correctly clean and no attack succeeds on it (per-sample worst case over the attacks). "
        "The non-adaptive figure is what an evaluation without a detector-aware attacker would print.</p>")
    head = ("<tr><th>attack</th><th class=\"num\">attacked</th><th class=\"num\">misclassified</th><th class=\"num\">"
            "ROC AUC</th><th class=\"num\">detected at the threshold</th><th class=\"num\">fooled (misclassified, "
            "not flagged)</th><th class=\"num\">robust, classifier + detector</th><th class=\"num\">seconds</th></tr>")
    body = "".join(
        f"<tr><td>{page._e(_NAMES[k])}</td><td class=\"num\">{a['attacked']}</td><td class=\"num\">{a['misclassified']}"
        f"</td><td class=\"num\">{_auc(a['auc'])}</td><td class=\"num\">"
        f"{_pct(a['detection_rate'])}</td><td class=\"num\">{a['fooled']}</td><td class=\"num\">"
        f"{_pct(a['robust_accuracy'])}</td><td class=\"num\">{page._seconds(a.get('seconds'))}</td></tr>"
        for k, a in s["attacks"].items())
    parts.append(f'<h2>Per attack</h2><div class="scroll"><table>{head}{body}</table></div>'
                 f"<p>{page._e(_pct(s['clean_flag_rate']))} of the evaluated clean images are flagged (false "
                 "positives at the calibrated threshold).</p>")
    parts.append("<h2>ROC</h2>" + page._img(plot_roc(rows, list(s["attacks"]), s["threshold"], s["fpr"]), "ROC curves"))
    return parts
