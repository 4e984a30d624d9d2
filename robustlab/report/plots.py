"""Plots for reports: robust accuracy vs. epsilon, robust accuracy vs. attack iterations, and a gallery
of clean / adversarial / perturbation images. Each function returns PNG bytes.

Figures are drawn with matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), never through ``pyplot``: no global backend is switched, no figure is left open,
and nothing of matplotlib is imported until a plot is asked for.

Accuracies in a summary are fractions in [0, 1]; plots show them in percent. Epsilons are radii in
pixel units ([0, 1] scale); linf radii given as multiples of 1/255 are also shown in 1/255 units.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from robustlab.eval.metrics import wilson_interval
from robustlab.threat import format_eps  # noqa: F401  (the one epsilon format; used here and re-exported)

_NORM_NAMES = {"linf": "L∞", "l2": "L2", "l1": "L1"}
_DPI = 100


# ---------------------------------------------------------------------- formatting shared by report/leaderboard

def format_percent(value: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage with ``digits`` decimals (``0.8512 -> '85.12%'``); '—' if None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100.0 * float(value):.{digits}f}%"


def ci_text(p: float | None, n: int | None) -> str:
    """``'95% CI 86.2% – 91.7% (n = 500)'`` for a proportion ``p`` on ``n`` samples ('' if unknown)."""
    ci = wilson_interval(p, n)
    if ci is None:
        return ""
    return f"95% CI {format_percent(ci[0], 1)} – {format_percent(ci[1], 1)} (n = {n})"


def norm_name(norm: str) -> str:
    """``linf -> 'L∞'``, ``l2 -> 'L2'``; unknown norms are returned as given."""
    return _NORM_NAMES.get(str(norm).lower(), str(norm))


# ---------------------------------------------------------------------- figure plumbing

def _figure(width: float, height: float):
    """A figure on its own Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()


def _message_png(title: str, message: str) -> bytes:
    """A small placeholder image used when there is nothing to plot."""
    fig = _figure(6.4, 1.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=12)
    ax.text(0.5, 0.45, message, ha="center", va="center", fontsize=11, color="#555555", transform=ax.transAxes)
    return _png(fig)


def _style_accuracy_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylabel("robust accuracy (% of samples)", fontsize=11)
    ax.set_ylim(-2, 109)
    ax.set_yticks([0, 20, 40, 60, 80, 100])
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax.grid(True, which="major", alpha=0.35)
    ax.tick_params(labelsize=10)


def _annotate_points(ax, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Write each point's value next to it, skipping labels that would overlap one already written
    (the report lists every value in a table). Call after the axis limits are final."""
    if len(xs) > 20:
        return
    to_px = ax.transData.transform
    placed: list[tuple[float, float]] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        va, dy = "bottom", 4  # above-right: free space for a falling curve (the y axis leaves room above 100%)
        ha, dx = ("right", -5) if i == len(xs) - 1 and len(xs) > 1 else ("left", 5)
        px, py = to_px((x, y))
        # Label box centre in pixels (about 40 x 13 px at 9 pt and 100 dpi).
        cx = px + (dx + 20 if ha == "left" else dx - 20)
        cy = py + dy + 7
        if any(abs(cx - qx) < 44 and abs(cy - qy) < 15 for qx, qy in placed):
            continue
        placed.append((cx, cy))
        ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                    fontsize=9, color="#1f3b73")


def _shorten(text: str, width: int = 70) -> str:
    """Long strings (model paths) shortened from the left: '…/very/long/path.safetensors'."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


# ---------------------------------------------------------------------- curves

def plot_eps_curve(summary: dict[str, Any]) -> bytes:
    """Robust accuracy (%) against the perturbation radius epsilon, from ``summary["eps_curve"]``.

    The run's own threat epsilon is marked with a dashed line. When that epsilon is a multiple of 1/255
    (linf, e.g. 8/255), a top axis shows the radius in 1/255 units too. Values are written next to the
    points where they do not overlap. Returns PNG bytes (a placeholder image if there is no curve).
    """
    threat = summary.get("threat") or {}
    norm = str(threat.get("norm", "linf"))
    points = sorted(
        ((float(p["eps"]), float(p["robust_accuracy"])) for p in (summary.get("eps_curve") or [])
         if p.get("robust_accuracy") is not None),
        key=lambda p: p[0],
    )
    title = f"Robust accuracy vs. {norm_name(norm)} radius ε"
    if not points:
        return _message_png(title, "no epsilon curve was recorded for this run")
    xs = [p[0] for p in points]
    ys = [100.0 * p[1] for p in points]

    fig = _figure(7.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o", markersize=6, linewidth=2, color="#1f77b4", label="robust accuracy")
    mn = summary.get("min_norm") or {}
    if mn.get("curve"):
        mx = [float(p["eps"]) for p in mn["curve"]]
        ax.step(mx, [100.0 * p["robust_accuracy"] for p in mn["curve"]], where="post", linestyle=":",
                linewidth=1.8, color="#2ca02c", label="from minimum-norm distances")
        xs = xs + [max(mx)]
    eps = threat.get("eps")
    if eps is not None:
        ax.axvline(float(eps), color="#d62728", linestyle="--", linewidth=1.3,
                   label=f"evaluated threat ε = {format_eps(norm, float(eps))}")
    ax.set_xlabel(f"ε: {norm_name(norm)} radius of the perturbation (pixel values in [0, 1])", fontsize=11)
    _style_accuracy_axis(ax)
    xmax = max(xs + ([float(eps)] if eps is not None else []))
    ax.set_xlim(min(0.0, min(xs)) - 0.03 * (xmax or 1.0), xmax * 1.06 if xmax > 0 else 1.0)
    # A second axis in 1/255 units when the run's epsilon was given that way (8/255, not 0.3).
    in_255ths = eps is not None and "/255" in format_eps(norm, float(eps))
    if in_255ths:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * 255.0, lambda x: x / 255.0))
        top.set_xlabel("ε in units of 1/255", fontsize=10)
        top.tick_params(labelsize=9)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    model = summary.get("model")
    subtitle = f"\n{_shorten(str(model))}, {summary.get('dataset', '')}" if model else ""
    ax.set_title(title + subtitle, fontsize=12)
    fig.subplots_adjust(left=0.105, right=0.975, bottom=0.115, top=0.79 if in_255ths else 0.86)
    _annotate_points(ax, xs, ys)
    return _png(fig)


def plot_steps_curve(summary: dict[str, Any]) -> bytes:
    """Robust accuracy (%) against the number of attack iterations, from ``summary["steps_curve"]``.

    The x axis is logarithmic when the step counts span a factor of 10 or more. A curve that is still
    falling at the right edge means the attack had not converged. Returns PNG bytes (a placeholder image
    if there is no steps curve).
    """
    curve = summary.get("steps_curve") or {}
    attack = str(curve.get("attack", "attack"))
    what = "queries" if curve.get("param") == "queries" else "iterations"
    title = f"Robust accuracy vs. {what} of {attack}"
    points = sorted(
        ((int(p["steps"]), float(p["robust_accuracy"])) for p in (curve.get("points") or [])
         if p.get("robust_accuracy") is not None),
        key=lambda p: p[0],
    )
    if not points:
        return _message_png("Robust accuracy vs. attack iterations", "no steps curve was recorded for this run")
    xs = [p[0] for p in points]
    ys = [100.0 * p[1] for p in points]

    fig = _figure(7.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o", markersize=6, linewidth=2, color="#2ca02c", label=f"{attack} alone")
    reported = summary.get("robust_accuracy")
    if reported is not None:
        ax.axhline(100.0 * float(reported), color="#555555", linestyle=":", linewidth=1.5,
                   label=f"reported robust accuracy (all attacks): {100.0 * float(reported):.2f}%")
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs) and max(xs) / min(xs) >= 10:
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        scale = "log scale"
    else:
        ax.set_xticks(xs)
        span = max(xs) - min(xs) or 1
        ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.05 * span)
        scale = "linear scale"
    ax.set_xlabel(f"attack {what} ({curve.get('kind', 'white-box')}, {scale})", fontsize=11)
    _style_accuracy_axis(ax)
    eps = curve.get("eps")
    norm = str((summary.get("threat") or {}).get("norm", "linf"))
    sub = f"{norm_name(norm)} ε = {format_eps(norm, float(eps))}" if eps is not None else ""
    ax.set_title(title + (f"\n{sub}" if sub else ""), fontsize=12)
    fig.subplots_adjust(left=0.105, right=0.975, bottom=0.115, top=0.86)
    _annotate_points(ax, xs, ys)
    return _png(fig)


# ---------------------------------------------------------------------- gallery

def _label(index: int | None, classes: Sequence[str] | None) -> str:
    if index is None:
        return "?"
    if classes is not None and 0 <= int(index) < len(classes):
        name = str(classes[int(index)])
        return name if len(name) <= 14 else name[:13] + "…"
    return str(int(index))


def _hwc(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(C, H, W) or (H, W) -> an array imshow takes, and whether it is grayscale."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 2:
        return a, True
    if a.ndim != 3:
        raise ValueError(f"gallery images must be (C, H, W) or (H, W), got shape {a.shape}")
    if a.shape[0] == 1:
        return a[0], True
    if a.shape[0] >= 3:
        return np.transpose(a[:3], (1, 2, 0)), False
    return a.mean(axis=0), True  # two channels: show their mean


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (keeps pixels crisp at 100% zoom)."""
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def plot_gallery(examples: Sequence[Any], classes: Sequence[str] | None = None) -> bytes:
    """A grid of adversarial examples: for each, the clean image, the adversarial image, and the
    perturbation ``adv - clean`` amplified to the full range (``delta * 0.5 / max|delta| + 0.5``, so mid-gray
    means unchanged), headed by the sample index, the true label and the adversarial prediction.

    ``examples``: objects with ``sample_index``, ``label``, ``adv_pred``, ``clean`` and ``adv`` ((C, H, W)
    floats in [0, 1]), such as :class:`robustlab.eval.store.Example`. ``classes``: optional class names
    (indices are shown otherwise). Grayscale images are drawn in gray. Small images are enlarged by an
    integer factor with nearest-neighbour sampling so every pixel stays visible. Returns PNG bytes.

    The whole grid is composed into one array and drawn on a single axes at one image pixel per screen
    pixel: fast, and sharp at 100% zoom.
    """
    examples = list(examples)
    if not examples:
        return _message_png("Adversarial examples", "no adversarial examples were stored for this run")
    tiles = []
    gray = True
    for ex in examples:
        clean, g1 = _hwc(ex.clean)
        adv, g2 = _hwc(ex.adv)
        gray = gray and g1 and g2
        tiles.append((ex, clean, adv))
    height = max(t[1].shape[0] for t in tiles)
    width = max(t[1].shape[1] for t in tiles)
    factor = max(1, math.ceil(96 / max(height, width)))
    th, tw = height * factor, width * factor

    n = len(examples)
    groups_per_row = 1 if n == 1 else (2 if n <= 8 or 3 * tw * 3 > 1500 else 3)
    rows = math.ceil(n / groups_per_row)
    gap, group_gap, head, margin, top = 6, 30, 40, 12, 58
    group_w = 3 * tw + 2 * gap
    fig_w = max(2 * margin + groups_per_row * group_w + (groups_per_row - 1) * group_gap, 520)
    fig_h = top + rows * (head + th) + (rows - 1) * 14 + margin
    canvas = np.ones((fig_h, fig_w, 3), dtype=np.float32)
    labels = []  # (x, y, text, size, color, weight, alignment)

    def paste(img: np.ndarray, y: int, x: int) -> None:
        img = _upscale(np.clip(img, 0.0, 1.0), factor)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        canvas[y - 1:y + h + 1, x - 1:x + w + 1] = 0.55  # a 1-pixel frame, so white images stay visible
        canvas[y:y + h, x:x + w] = img

    left0 = (fig_w - (groups_per_row * group_w + (groups_per_row - 1) * group_gap)) // 2
    for k, (ex, clean, adv) in enumerate(tiles):
        r, g = divmod(k, groups_per_row)
        x0 = left0 + g * (group_w + group_gap)
        y0 = top + r * (head + th + 14)
        if clean.shape != adv.shape:
            raise ValueError(f"example {ex.sample_index}: clean {clean.shape} and adversarial {adv.shape} differ")
        delta = adv - clean
        peak = float(np.abs(delta).max())
        shown = delta * (0.5 / peak) + 0.5 if peak > 0 else np.full_like(delta, 0.5)
        if not gray and clean.ndim == 2:  # a grayscale example among colour ones
            clean, adv, shown = (np.repeat(a[:, :, None], 3, axis=2) for a in (clean, adv, shown))
        for j, img in enumerate((clean, adv, shown)):
            paste(img, y0 + head, x0 + j * (tw + gap))
        right = x0 + group_w
        labels.append((x0, y0 + 3, f"#{ex.sample_index}  true: {_label(ex.label, classes)}", 10, "#111111", "bold", "left"))
        labels.append((x0, y0 + 20, f"adv: {_label(ex.adv_pred, classes)}", 10, "#b00020", "bold", "left"))
        gain = 0.5 / peak if peak > 0 else 0.0
        amp = (f"δ ×{gain:.0f}" if gain >= 10 else f"δ ×{gain:.2g}") + f" (max |δ| {peak:.3g})" if peak > 0 else "δ = 0"
        labels.append((right, y0 + 21, amp, 8.5, "#555555", "normal", "right"))

    fig = _figure(fig_w / _DPI, fig_h / _DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(canvas, interpolation="nearest", extent=(0, fig_w, fig_h, 0), aspect="auto")
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)
    ax.text(fig_w / 2, 8, "Adversarial examples", ha="center", va="top", fontsize=12, weight="bold")
    ax.text(fig_w / 2, 28, "each: clean  |  adversarial  |  perturbation δ amplified to full range (mid-gray = unchanged)",
            ha="center", va="top", fontsize=9.5, color="#333333")
    for x, y, text, size, color, weight, align in labels:
        ax.text(x, y, text, ha=align, va="top", fontsize=size, color=color, weight=weight, clip_on=False)
    return _png(fig)


def plot_certified_curve(radii: Sequence[float], n: int, norm: str, marks: dict[str, float | None],
                         empirical: tuple[float, float] | None = None, title_extra: str = "",
                         max_radius: float | None = None) -> bytes:
    """Certified accuracy (%) against the radius r: the fraction of the ``n`` samples predicted
    correctly with a certified radius >= r, drawn as a step curve from the per-sample ``radii`` of
    the correct, certified samples; ``marks`` (radius -> accuracy) are the reported points;
    ``empirical`` = (radius, accuracy) of the attack check, drawn as a cross above the curve;
    ``max_radius``: the largest radius the run's number of draws can certify (a dotted line)."""
    title = f"Certified accuracy vs. {norm_name(norm) if norm != 'l0' else 'L0 (pixels)'} radius"
    if not n:
        return _message_png(title, "no sample has been certified yet")
    rs = sorted(float(r) for r in radii)
    top = max(rs + [float(r) for r in marks] + [empirical[0] if empirical else 0.0] + [1e-3])
    xs, ys = [0.0], [100.0 * len(rs) / n]
    for i, r in enumerate(rs):  # the curve drops after each certified radius
        xs.append(r)
        ys.append(100.0 * (len(rs) - i - 1) / n)
    xs.append(top * 1.05)
    ys.append(ys[-1])
    fig = _figure(7.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(xs[:1] + xs[1:], [ys[0]] + ys[:-1], where="post", linewidth=2, color="#1f77b4",
            label="certified accuracy (correct, radius ≥ r)")
    points = [(float(r), 100.0 * a) for r, a in marks.items() if a is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="#1f77b4", markersize=6)
    if empirical is not None:
        ax.plot([empirical[0]], [100.0 * empirical[1]], "x", color="#d62728", markersize=10, markeredgewidth=2.5,
                label="empirical accuracy (attack on the smoothed classifier)")
    if max_radius is not None and max_radius < top * 1.05:
        ax.axvline(max_radius, color="#7f7f7f", linestyle=":", linewidth=1.5,
                   label=f"largest radius these draws can certify ({max_radius:.3g})")
    ax.set_xlabel(f"radius r ({norm_name(norm) if norm != 'l0' else 'pixels changed'}, pixel values in [0, 1])",
                  fontsize=11)
    _style_accuracy_axis(ax)
    ax.set_ylabel("accuracy (% of samples)", fontsize=11)
    ax.set_xlim(-0.02 * top, top * 1.05)
    ax.legend(loc="lower left", fontsize=9, framealpha=0.9)
    ax.set_title(title + (f"\n{_shorten(title_extra)}" if title_extra else ""), fontsize=12)
    fig.subplots_adjust(left=0.105, right=0.975, bottom=0.115, top=0.86)
    if points:
        _annotate_points(ax, [p[0] for p in points], [p[1] for p in points])
    return _png(fig)
