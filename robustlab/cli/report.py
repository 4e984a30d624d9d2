"""``robustlab report``: the HTML report (plus JSON and CSV) of one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustlab.cli.common import DEFAULT_DB, _require_db


def cmd_report(args: argparse.Namespace) -> int:
    from robustlab.eval.store import ResultsStore
    from robustlab.report.html import write_report

    _require_db(args.db)
    with ResultsStore(args.db, readonly=True) as store:
        run_id = store.resolve_run(args.run)
        out = Path(args.out) if args.out else Path(f"report-{run_id}")
        paths = write_report(store, run_id, out)
    for p in paths.values():
        print(p)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="write an HTML report (plus JSON and CSV) for a run")
    r.add_argument("run", help="run id, unique prefix, or 'latest'")
    r.add_argument("--db", default=DEFAULT_DB)
    r.add_argument("--out", help="output folder (default report-RUN)")
    r.set_defaults(func=cmd_report)
