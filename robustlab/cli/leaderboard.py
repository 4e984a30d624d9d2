"""``robustlab leaderboard``: rank the store's complete runs per (data set, threat model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustlab.cli.common import DEFAULT_DB, _require_db, _say


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustlab.eval.store import ResultsStore
    from robustlab.report.leaderboard import format_leaderboard, leaderboard, write_leaderboard_html

    _require_db(args.db)
    with ResultsStore(args.db) as store:
        groups = leaderboard(store)
    print(format_leaderboard(groups))
    path = write_leaderboard_html(groups, Path(args.out))
    _say(f"written {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    lb = sub.add_parser("leaderboard", help="rank all runs in the store per (data set, threat model)")
    lb.add_argument("--db", default=DEFAULT_DB)
    lb.add_argument("--out", default="leaderboard.html", help="HTML output path")
    lb.set_defaults(func=cmd_leaderboard)
