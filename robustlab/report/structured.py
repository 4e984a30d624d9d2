"""Reports of a structured run (``robustlab.eval.protocols.structured``): the text ``robustlab
structured`` prints and the HTML page ``robustlab report`` writes (one section per threat model:
clean and robust accuracy, the fooling rate of a universal perturbation, random- and worst-position
accuracy of a patch, what broke how many points, the fit, and a picture of the fitted perturbation or
patch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from robustlab.report.plots import _figure, _hwc, _png, ci_text, format_percent

_LABELS = {"robust_accuracy": "robust accuracy", "clean_accuracy": "clean accuracy",
           "fooling_rate": "fooling rate (prediction changed)", "random_position_accuracy": "accuracy, random position",
           "worst_position_accuracy": "accuracy, worst position"}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _numbers(t: dict[str, Any]) -> list[tuple[str, float | None]]:
    """A threat model's headline numbers, in the order shown."""
    if t["kind"] == "patch":
        keys = ("clean_accuracy", "random_position_accuracy", "worst_position_accuracy")
    elif t["kind"] == "universal":
        keys = ("clean_accuracy", "robust_accuracy", "fooling_rate")
    else:
        keys = ("clean_accuracy", "robust_accuracy")
    return [(_LABELS[k], t.get(k)) for k in keys]


def _fit_text(fit: dict[str, Any] | None) -> str:
    if not fit:
        return ""
    parts = [f"fitted on {fit.get('n')} training images" + (f" ({fit['source']})" if fit.get("source") else "")]
    if fit.get("fooled") is not None:
        parts.append(f"fooling {_pct(fit['fooled'])} of them")
    if fit.get("norm") is not None:
        parts.append(f"norm {fit['norm']:.4g}")
    return ", ".join(parts)


def format_structured(s: dict[str, Any], checks: list[dict[str, str]], title: str) -> str:
    """The lines ``robustlab structured`` prints."""
    lines = [f"{title} (n={s['n']}), clean accuracy {_pct(s['clean_accuracy'])}"]
    for name, t in s["threats"].items():
        numbers = ", ".join(f"{label} {_pct(v)}" for label, v in _numbers(t)[1:])
        lines.append(f"  {name:<32} {numbers}   ({ci_text(t['robust_accuracy'], t['n'])})")
        broken = ", ".join(f"{k} {v}" for k, v in t["broken_by"].items())
        extra = [f"broken by {broken}" if broken else "", _fit_text(t.get("fit"))]
        if t.get("rejected"):
            extra.append(f"{t['rejected']} claims rejected by verification")
        if any(extra):
            lines.append("    " + "; ".join(e for e in extra if e))
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def plot_fitted(value: np.ndarray, kind: str) -> bytes:
    """The fitted universal perturbation (amplified, mid-gray: unchanged) or patch, as an image."""
    image = value if kind == "patch" else value * 0.5 / max(float(np.abs(value).max()), 1e-12) + 0.5
    hwc, gray = _hwc(np.clip(image, 0, 1))
    fig = _figure(2.6, 2.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(hwc, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("the patch" if kind == "patch" else "the perturbation (amplified)", fontsize=10)
    return _png(fig)


def write_structured_report(store: Any, info: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.html``, ``summary.json`` and ``samples.csv`` (every threat model's rows, with the task)
    of a structured run into ``out``."""
    from robustlab.report import html as page

    def body(run: dict[str, Any], s: dict[str, Any], rows: list[Any], partial: bool) -> list[str]:
        return _body(store, run, s, partial)

    return page.write_protocol_report(store, info, out, "robustlab structured", body, all_tasks=True)


def _body(store: Any, run: dict[str, Any], s: dict[str, Any], partial: bool) -> list[str]:
    from robustlab.eval.protocols.structured import _bytes_tensor, fit_file
    from robustlab.report import html as page

    parts = [f"<h1>Structured threat models: {page._e(run['model'])}</h1>",
             (f'<p class="sub">{page._e(run["dataset"])} / {page._e(run["split"])}, n = {page._int(run["n"])} · '
              f"{page._e(', '.join(s['threats']))} · run <code>{page._e(run['run_id'])}</code></p>")]
    if partial or run.get("status") != "complete":
        parts.append(f'<div class="banner incomplete"><strong>INCOMPLETE RUN (status: {page._e(run.get("status"))}).'
                     f"</strong> {page._int(s['n'])} of {page._int(run['n'])} samples are evaluated under every threat "
                     "model so far; resume the run to finish it.</div>")
    fit = s.get("fit") or {}
    parts.append(page._kv_table([
        ("Model", run["model"]), ("Dataset / split", f"{run['dataset']} / {run['split']}"), ("Samples (n)", run["n"]),
        ("Threat models", ", ".join(s["threats"])),
        ("Fitted on", f"{fit.get('n')} training images ({fit.get('source')}), once per run, seeded" if fit else "—"),
        ("Seed", run["seed"]), ("Status", run.get("status")), ("Run id", run["run_id"]),
    ]))
    parts.append('<p class="muted">Each threat model is its own evaluation. Spatial: a point is robust when no '
                 "rotation and translation within the bounds that the attacks found fools it (worst case over the "
                 "grid search and the first-order attack; every counted point re-rendered from its parameters). "
                 "Universal: one perturbation, fitted on training images, added to every image; robust means "
                 "correct clean and perturbed; the fooling rate counts changed predictions over all images. Patch: "
                 "one patch fitted on training images, placed at random positions (the mean accuracy) and at the "
                 "worst position of a grid (robust only if no position fools it). Only points classified correctly "
                 "clean are attacked; every counted adversarial image is re-verified.</p>")
    for name, t in s["threats"].items():
        n = t["n"]
        parts.append(f"<h2>{page._e(name)}</h2><div class=\"headline\">" + "".join(
            f'<div class="metric"><div class="value">{format_percent(v)}</div><div class="label">{page._e(label)}<br>'
            f"{page._e(ci_text(v, n))}</div></div>" for label, v in _numbers(t)) + "</div>")
        items = [("Attacks", ", ".join(t["attacks"])),
                 ("Broken by", ", ".join(f"{k}: {v}" for k, v in t["broken_by"].items()) or "none"),
                 ("Claims rejected by verification", t.get("rejected", 0)), ("Seconds", page._seconds(t.get("seconds")))]
        if t.get("median_fooling"):
            m = t["median_fooling"]
            text = f"|angle| {m['angle']:.3g}°, |dx| {m['dx']:.3g} px, |dy| {m['dy']:.3g} px"
            items.append(("Median transformation that fooled", text))
        if t.get("draws"):
            items.append(("Random positions per image", t["draws"]))
        if t.get("fit"):
            items.append(("Fit", _fit_text(t["fit"])))
        parts.append(page._kv_table(items))
        kept = store.load_file(run["run_id"], fit_file(name))
        if kept is not None:
            parts.append(page._img(plot_fitted(_bytes_tensor(kept).numpy(), t["kind"]), f"fitted {t['kind']}"))
    return parts
