"""Benchmarks: the results store, reports, plots and the leaderboard."""

from robustlab.bench.leaderboard import format_leaderboard, leaderboard, write_leaderboard_html
from robustlab.bench.plots import plot_eps_curve, plot_gallery, plot_steps_curve
from robustlab.bench.report import write_report
from robustlab.bench.store import ResultsStore

__all__ = [
    "ResultsStore",
    "format_leaderboard",
    "leaderboard",
    "plot_eps_curve",
    "plot_gallery",
    "plot_steps_curve",
    "write_leaderboard_html",
    "write_report",
]
