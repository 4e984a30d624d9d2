"""What people read: the HTML report, text summaries, plots, the leaderboard and its static site."""

from robustlab.report.html import write_report
from robustlab.report.leaderboard import (
    build_leaderboard,
    format_leaderboard,
    leaderboard,
)
from robustlab.report.plots import plot_eps_curve, plot_gallery, plot_steps_curve
from robustlab.report.site import write_site
from robustlab.report.text import format_summary

__all__ = [
    "build_leaderboard",
    "format_leaderboard",
    "format_summary",
    "leaderboard",
    "plot_eps_curve",
    "plot_gallery",
    "plot_steps_curve",
    "write_report",
    "write_site",
]
