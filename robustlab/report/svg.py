"""Inline SVG plots for the leaderboard site: a scatter of two metrics (one point per model, linked to
its page) and line curves (robust accuracy against epsilon or attack strength). Plain strings, no
plotting library: a page with a thousand points is written in milliseconds and needs nothing to show.

Values are fractions in [0, 1] on percentage axes unless ``percent=False``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

_W, _H = 420, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 26, 26, 40
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass
class Point:
    x: float
    y: float
    label: str = ""
    href: str | None = None
    highlight: bool = True  # drawn filled (e.g. ranked) or hollow


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _nice_step(span: float) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about four intervals over ``span``."""
    raw = span / 4
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _range(values: Sequence[float], percent: bool) -> tuple[float, float]:
    """The axis range: [0, 1] for percentages, else round numbers around the values (from 0 when
    they are all >= 0)."""
    if percent:
        return 0.0, 1.0
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    lo = 0.0 if lo >= 0 else lo
    if hi == lo:
        hi = lo + 1.0
    step = _nice_step(hi - lo)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step


def _tick(value: float, percent: bool) -> str:
    return f"{100 * value:.0f}%" if percent else f"{value:.4g}"


def _ticks(r: tuple[float, float]) -> list[float]:
    step = _nice_step(r[1] - r[0])
    first = math.ceil(r[0] / step - 1e-9)
    return [k * step for k in range(first, math.floor(r[1] / step + 1e-9) + 1)]


def _frame(title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float],
           xpercent: bool, ypercent: bool) -> tuple[list[str], callable, callable]:
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(v: float) -> float:
        return _LEFT + (v - xr[0]) / (xr[1] - xr[0]) * pw

    def sy(v: float) -> float:
        return _TOP + ph - (v - yr[0]) / (yr[1] - yr[0]) * ph

    parts = [(f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
              f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(title)}">'),
             f'<text x="{_W / 2:.0f}" y="16" text-anchor="middle" font-weight="600">{_e(title)}</text>',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for fx in _ticks(xr):
        parts.append(f'<line x1="{sx(fx):.1f}" y1="{_TOP}" x2="{sx(fx):.1f}" y2="{_TOP + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{sx(fx):.1f}" y="{_TOP + ph + 14}" text-anchor="middle">{_tick(fx, xpercent)}</text>')
    for fy in _ticks(yr):
        parts.append(f'<line x1="{_LEFT}" y1="{sy(fy):.1f}" x2="{_LEFT + pw}" y2="{sy(fy):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{_LEFT - 4}" y="{sy(fy) + 4:.1f}" text-anchor="end">{_tick(fy, ypercent)}</text>')
    parts.append(f'<text x="{_LEFT + pw / 2:.0f}" y="{_H - 6}" text-anchor="middle">{_e(xlabel)}</text>')
    parts.append(f'<text transform="translate(12 {_TOP + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
                 f'{_e(ylabel)}</text>')
    return parts, sx, sy


def scatter(points: Sequence[Point], title: str, xlabel: str, ylabel: str, percent: bool = True) -> str:
    """One dot per point (a link when it has ``href``; its label shows on hover)."""
    xr = _range([p.x for p in points], percent)
    yr = _range([p.y for p in points], percent)
    parts, sx, sy = _frame(title, xlabel, ylabel, xr, yr, percent, percent)
    for p in points:
        fill = _COLOURS[0] if p.highlight else "none"
        dot = (f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="4" fill="{fill}" stroke="{_COLOURS[0]}">'
               f'<title>{_e(p.label)}</title></circle>')
        parts.append(f'<a href="{_e(p.href)}">{dot}</a>' if p.href else dot)
    parts.append("</svg>")
    return "".join(parts)


def lines(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], title: str, xlabel: str, ylabel: str,
          ypercent: bool = True) -> str:
    """Each series (name, [(x, y), ...]) as a polyline with dots; x on a linear axis."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xr = _range(xs, False)
    yr = _range(ys, ypercent)
    parts, sx, sy = _frame(title, xlabel, ylabel, xr, yr, False, ypercent)
    for i, (name, pts) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            value = f"{100 * y:.2f}%" if ypercent else f"{y:.4g}"
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                         f'<title>{_e(name)}: {x:.4g} → {value}</title></circle>')
        if len(series) > 1:
            parts.append(f'<text x="{_W - _RIGHT - 4}" y="{_TOP + 14 + 13 * i}" text-anchor="end" fill="{colour}">'
                         f'{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
