"""``robustlab demo``: train a small model on the embedded digits and evaluate it end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustlab.cli.common import _device


def cmd_demo(args: argparse.Namespace) -> int:
    from robustlab.demo import run_demo

    paths = run_demo(Path(args.out), device=_device(args.device))
    print(f"results store: {paths['db']}")
    print(f"report:        {paths['report']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train a small model on the embedded digits and evaluate it end to end")
    d.add_argument("--out", default="robustlab-demo", help="output folder")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)
