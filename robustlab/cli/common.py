"""What every command shares: argument converters, the device choice, messages on stderr, the
default results store."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from robustlab.errors import RobustlabError

if TYPE_CHECKING:
    from robustlab.eval.store import ResultsStore

DEFAULT_DB = "results.db"

MODEL_HELP = ("the model: a checkpoint X.safetensors (its card X.json beside it), zoo:NAME (a model of the local zoo, "
              "see `robustlab zoo list`), torchvision:NAME / timm:NAME / robustbench:NAME with --weights FILE, "
              "file.py:function / module:function returning an nn.Module, or a registry architecture "
              "(`robustlab list models`; random weights unless --weights)")
DATA_HELP = ("data set: a name from `robustlab list datasets` (digits is embedded; mnist, fashion_mnist, cifar10, "
             "cifar100, svhn are read from --data-root), an image folder path (./DIR/<class>/*.png; a path with a "
             "slash), or imagenet-val:DIR (ImageNet-style <wnid> folders; labels in the order of a "
             "LOC_synset_mapping.txt / synsets.txt / imagenet_class_index.json found in DIR or its parent). Folders "
             "are streamed and resized/cropped as the model's card says")

# Help of the options several commands share, one text each: an option a command adds without its own
# help gets this one (see fill_shared_help); anything else needs its own (tests/test_cli_help.py).
SHARED_HELP = {
    "--db": f"results store, one SQLite file (default {DEFAULT_DB}); commands that only read it open it read-only",
    "--device": "cpu, cuda, cuda:N, or auto (default: cuda when available, else cpu)",
    "--seed": "seed of every random draw (random starts, data order); the same seed gives the same numbers "
              "(default %(default)s)",
    "--batch-size": "images per batch (default %(default)s)",
    "--data": DATA_HELP,
    "--split": "the split to use: test (default) or train (svhn also has extra)",
    "--data-root": "folder with the data set files (default: $ROBUSTLAB_DATA or ./data)",
    "--norm": "threat model norm: linf, l2 or l1",
    "--eps": "threat model radius in [0, 1] pixel units (fractions like 8/255 work)",
}


def fill_shared_help(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` and its subcommands that has no help of its own the shared text
    of :data:`SHARED_HELP`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                fill_shared_help(sub)
        elif not action.help:
            for option in action.option_strings:
                if option in SHARED_HELP:
                    action.help = SHARED_HELP[option]
                    break


def _argument_type(convert):
    """Turn a converter's RobustlabError into argparse's own error (usage line, exit status 2)."""

    def wrapped(text: str):
        try:
            return convert(text)
        except RobustlabError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = convert.__name__.strip("_")
    return wrapped


def _floats(text: str) -> list[float]:
    from robustlab.params import parse_value

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        value = parse_value(part)
        num, slash, den = part.partition("/")
        if slash and parse_value(den.strip()) == 0:
            raise RobustlabError(f"{part!r} divides by zero")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RobustlabError(f"{part!r} in {text!r} is not a number")
        out.append(float(value))
    return out


def _number(text: str) -> float:
    values = _floats(text)
    if len(values) != 1:
        raise RobustlabError(f"expected one number, got {text!r}")
    return values[0]


def _steps_grid(text: str) -> tuple[int, ...] | None:
    if text.lower() in ("none", "off", ""):
        return ()
    if text.lower() == "auto":
        return None
    values = _floats(text)
    if any(v != int(v) or v < 1 for v in values):
        raise RobustlabError(f"the steps grid must be whole numbers >= 1, got {text!r}")
    return tuple(int(v) for v in values)


def _device(name: str | None):
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustlabError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustlabError("--device cuda was asked for but no CUDA device is available")
    return device


@contextlib.contextmanager
def rank_store(db: str) -> Iterator[ResultsStore | None]:
    """The results store of a command's run as torchrun ranks share it: rank 0 opens ``db`` for
    writing, the other ranks get None (rank 0 hands out their batches and writes their rows). On the way
    out a store the run never wrote to is removed, so a run that failed before it began leaves no empty
    store behind."""
    from robustlab import distributed
    from robustlab.eval.store import ResultsStore

    distributed.init_from_env()
    store = ResultsStore(db, readonly=False) if distributed.is_main() else None
    try:
        yield store
    finally:
        if store is not None:
            store.discard_if_unused()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def print_run(args: argparse.Namespace, result, text: str, fields: dict) -> int:
    """A finished run on standard output: with ``--json`` its id, store, whether it resumed, and
    ``fields``; otherwise ``text`` and the command that writes its report. Returns 0."""
    import json

    if args.json:
        print(json.dumps({"run_id": result.run_id, "db": str(Path(args.db)), "resumed": result.resumed, **fields},
                         indent=2))
    else:
        print(text)
        print(f"run {result.run_id} in {args.db}; `robustlab report {result.run_id} --db {args.db}` writes the report")
    return 0


def _require_db(db: str) -> None:
    if not Path(db).is_file():
        raise RobustlabError(f"no results store at {db}; run `robustlab eval ... --db {db}` first")



def _threat(norm: str, eps: float):
    """The threat model of ``--norm`` / ``--eps``; a linf radius wider than the [0, 1] box (every image
    reachable, usually a 0..255 value given where pixel units are meant) is refused."""
    from robustlab.threat import ThreatModel

    threat = ThreatModel(norm, eps)
    if threat.norm == "linf" and threat.eps > threat.upper - threat.lower:
        raise RobustlabError(f"--eps {eps:g} under linf is wider than the [0, 1] pixel box, so every image is "
                             "reachable; epsilons are in [0, 1] pixel units (8/255, not 8)")
    return threat


# ---------------------------------------------------------------------- options several commands share

def add_model_data_options(p: argparse.ArgumentParser,
                           samples_flag: str | tuple[str, ...] = ("--n", "--num-examples")) -> None:
    """--model, --data, --split, --data-root, the sample count (``samples_flag``, or several names of
    it; by default --n and --num-examples, as torchrun's own parser takes --n for its --nnodes), --device,
    --seed."""
    p.add_argument("--model", required=True, help="registry name, checkpoint path, or file.py:function / module:function")
    p.add_argument("--data", required=True, help="data set name (digits, mnist, cifar10, ...) or folder")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--data-root", help="folder with the data set files (default: $ROBUSTLAB_DATA or ./data)")
    flags = (samples_flag,) if isinstance(samples_flag, str) else samples_flag
    p.add_argument(*flags, dest="samples", type=int, help="use the first N images of the split, in order")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run (default 0)")


def add_store_options(p: argparse.ArgumentParser) -> None:
    """--db, --resume, --json."""
    p.add_argument("--db", default=DEFAULT_DB, help=f"results store (SQLite), default {DEFAULT_DB}")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run with the same configuration")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def load_data(args: argparse.Namespace):
    """The data set of ``--data``/``--split``/``--data-root``, cut to the first ``args.samples``."""
    from robustlab.data import load_dataset

    if args.samples is not None and args.samples < 1:
        raise RobustlabError(f"the number of images must be >= 1, got {args.samples}")
    return first_samples(load_dataset(args.data, args.split, root=args.data_root), args.samples)


def first_samples(data, samples: int | None):
    """``data`` cut to its first ``samples`` (all of it for None), saying so when it has fewer."""
    if samples is not None and samples < 1:
        raise RobustlabError(f"the number of images must be >= 1, got {samples}")
    if samples:
        if samples > len(data):
            _say(f"robustlab: note: {samples} images asked for, but {data.name}:{data.split} has {len(data)}; "
                 f"using all {len(data)}")
        data = data.subset(samples)
    return data


def load_model_on(spec: str, device):
    """A model loaded from ``spec`` onto ``device`` (loader warnings said on stderr)."""
    import warnings

    from robustlab.models import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(spec, device=device)
    for w in caught:
        _say(f"robustlab: warning: {w.message}")
    loaded.model.to(device)
    return loaded
