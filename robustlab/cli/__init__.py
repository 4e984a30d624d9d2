"""The ``robustlab`` command: parse, build objects from registries, call the library.

Problems the user can fix print one line ``robustlab: error: ...`` and exit with status 2; no
traceback (set ROBUSTLAB_DEBUG=1 to see one for unexpected errors).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import NoReturn

from robustlab.cli import (
    adapt,
    certify,
    corrupt,
    demo,
    detect,
    eval,
    leaderboard,
    listing,
    perturb,
    purify,
    report,
    structured,
    train,
    zeroshot,
    zoo,
)
from robustlab.cli.common import DEFAULT_DB, _say, fill_shared_help
from robustlab.errors import RobustlabError

__all__ = ["DEFAULT_DB", "build_parser", "main"]

# One module per command, in the order `robustlab --help` lists them.
COMMANDS = (train, eval, certify, corrupt, detect, structured, zeroshot, adapt, purify, report, leaderboard, perturb, zoo,
            listing, demo)


# What a Ctrl-C leaves behind, per command.
INTERRUPTED = {
    "eval": "finished batches are saved in the results store, continue with --resume",
    "certify": "finished batches are saved in the results store, continue with --resume",
    "zeroshot": "finished batches are saved in the results store, continue with --resume",
    "detect": "finished batches are saved in the results store, continue with --resume",
    "structured": "finished batches and fitted perturbations and patches are saved in the results store, continue "
                  "with --resume",
    "corrupt": "finished batches are saved (files: run the same command again; evaluations: add --resume)",
    "adapt": "the training state is saved after every finished epoch; continue with --resume",
    "train": "the training state is saved after every finished epoch and every --save-every-minutes inside one; "
             "continue from the last one with --resume",
    "purify": "a purifier in training saves its state after every epoch and every --save-every-minutes inside one; "
              "continue with `robustlab purify train ... --resume`",
}


class _Parser(argparse.ArgumentParser):
    """argparse with robustlab's one error line: the usage, then ``robustlab: error: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"robustlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from robustlab import __version__

    p = _Parser(prog="robustlab", description="Measure and improve adversarial robustness.")
    p.add_argument("--version", action="version", version=f"robustlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    fill_shared_help(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RobustlabError as exc:
        _say(f"robustlab: error: {exc}")
        return 2
    except KeyboardInterrupt as exc:  # a command may say exactly what it saved (the exception's text)
        _say(f"robustlab: interrupted; {str(exc) or INTERRUPTED.get(args.command, 'nothing was saved')}")
        return 130
    except BrokenPipeError:  # the reader went away (`robustlab zoo show X | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        line = _os_error_line(exc)
        if line is None:
            return _internal(exc)
        _say(f"robustlab: error: {line}")
        return 2
    except sqlite3.OperationalError as exc:  # the store became unwritable while a command ran
        if "readonly" not in str(exc):
            return _internal(exc)
        _say(f"robustlab: error: cannot write the results store {getattr(args, 'db', '')}: permission denied "
             f"(SQLite said: {exc})")
        return 2
    except Exception as exc:  # an unexpected failure: short message unless debugging
        return _internal(exc)


def _internal(exc: BaseException) -> int:
    """An unexpected failure: one line, or the traceback with ROBUSTLAB_DEBUG=1."""
    if os.environ.get("ROBUSTLAB_DEBUG"):
        raise exc
    _say(f"robustlab: internal error: {type(exc).__name__}: {exc} (set ROBUSTLAB_DEBUG=1 for the traceback)")
    return 1


def _os_error_line(exc: OSError) -> str | None:
    """One line for a file the user can fix (permissions, a read-only file system, a missing folder):
    it names the path. None for other OS errors."""
    import errno

    what = {errno.EACCES: "permission denied", errno.EPERM: "permission denied (operation not permitted)",
            errno.EROFS: "permission denied (read-only file system)", errno.ENOSPC: "no space left on the device",
            errno.ENOENT: "no such file or folder", errno.ENOTDIR: "a part of the path is not a folder",
            errno.EISDIR: "is a folder, not a file"}.get(exc.errno)
    if what is None or exc.filename is None:
        return None
    return f"{exc.filename}: {what}"
