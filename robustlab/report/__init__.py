"""What people read: the HTML report, text summaries, plots and the leaderboard."""

from robustlab.report.html import write_report
from robustlab.report.leaderboard import format_leaderboard, leaderboard, write_leaderboard_html
from robustlab.report.plots import plot_eps_curve, plot_gallery, plot_steps_curve
from robustlab.report.text import format_summary

__all__ = [
    "format_leaderboard",
    "format_summary",
    "leaderboard",
    "plot_eps_curve",
    "plot_gallery",
    "plot_steps_curve",
    "write_leaderboard_html",
    "write_report",
]
