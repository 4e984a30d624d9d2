"""``robustlab leaderboard``: the store's models ranked per comparable setting, printed, and written
as a static site (index, one page per model, RobustBench-style JSON, each run's report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustlab.cli.common import DEFAULT_DB, _require_db, _say
from robustlab.errors import RobustlabError

DEFAULT_SITE = "leaderboard"


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustlab.eval.store import ResultsStore
    from robustlab.report.leaderboard import format_leaderboard, leaderboard
    from robustlab.report.site import write_site

    if args.out is not None:
        raise RobustlabError(f"--out is gone: the leaderboard is a site now; write it with --site DIR "
                             f"(DIR/index.html is the page --out {args.out} was)")
    _require_db(args.db)
    with ResultsStore(args.db) as store:
        print(format_leaderboard(leaderboard(store)))
        if args.site is None:
            return 0
        result = write_site(store, Path(args.site), reports=not args.no_reports, log=_say)
    _say(f"wrote the leaderboard site: {result.index} ({result.model_pages} model pages, {result.json_records} JSON "
         f"records, {result.reports_written} reports written)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    lb = sub.add_parser(
        "leaderboard", help="rank the store's models per comparable setting and write the leaderboard site",
        description="Print the ranking and write a static site (opens from the file system, no server): "
        "SITE/index.html, SITE/models/<id>.html per model, SITE/json/... RobustBench-style records, "
        "SITE/leaderboard.json and SITE/runs/<run>/report.html per run.")
    lb.add_argument("--db", default=DEFAULT_DB, help=f"results store to read (default {DEFAULT_DB}); only read")
    lb.add_argument("--site", metavar="DIR", default=DEFAULT_SITE,
                    help=f"folder the site is written to (default ./{DEFAULT_SITE}/; index.html is its front page)")
    lb.add_argument("--no-site", dest="site", action="store_const", const=None,
                    help="only print the ranking, write no files")
    lb.add_argument("--no-reports", action="store_true",
                    help="do not write each run's report into SITE/runs/ (faster for large stores)")
    lb.add_argument("--out", help="removed (it wrote one page); says to use --site DIR, whose DIR/index.html is that page")
    lb.set_defaults(func=cmd_leaderboard)
