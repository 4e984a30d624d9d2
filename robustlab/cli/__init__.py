"""The ``robustlab`` command: parse, build objects from registries, call the library.

Problems the user can fix print one line ``robustlab: error: ...`` and exit with status 2; no
traceback (set ROBUSTLAB_DEBUG=1 to see one for unexpected errors).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from robustlab.cli import certify, corrupt, demo, eval, leaderboard, perturb, report, train, zoo
from robustlab.cli.common import DEFAULT_DB, _say
from robustlab.errors import RobustlabError

__all__ = ["DEFAULT_DB", "build_parser", "main"]

# One module per command, in the order `robustlab --help` lists them.
COMMANDS = (train, eval, certify, corrupt, report, leaderboard, perturb, zoo, demo)


# What a Ctrl-C leaves behind, per command.
INTERRUPTED = {
    "eval": "finished batches are saved in the results store, continue with --resume",
    "certify": "finished batches are saved in the results store, continue with --resume",
    "corrupt": "finished batches are saved (files: run the same command again; evaluations: add --resume)",
    "train": "the training state is saved after every finished epoch, continue from the last one with --resume",
}


def build_parser() -> argparse.ArgumentParser:
    from robustlab import __version__

    p = argparse.ArgumentParser(prog="robustlab", description="Measure and improve adversarial robustness.")
    p.add_argument("--version", action="version", version=f"robustlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RobustlabError as exc:
        _say(f"robustlab: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say(f"robustlab: interrupted; {INTERRUPTED.get(args.command, 'nothing was saved')}")
        return 130
    except BrokenPipeError:  # the reader went away (`robustlab zoo show X | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # an unexpected failure: short message unless debugging
        if os.environ.get("ROBUSTLAB_DEBUG"):
            raise
        _say(f"robustlab: internal error: {type(exc).__name__}: {exc} (set ROBUSTLAB_DEBUG=1 for the traceback)")
        return 1
