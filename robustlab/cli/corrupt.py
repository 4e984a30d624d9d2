"""``robustlab corrupt``: write a corrupted data set to disk (the released CIFAR-10-C layout), or
evaluate a model under corruptions into the results store (error per corruption and severity, mCE).

    robustlab corrupt --data cifar10 --n 1000 --out cifar10-c/            # files, resumable
    robustlab corrupt --model M --data mnist --corruptions mnist-c --baseline RUN --db runs.db
    robustlab corrupt --model M --data cifar10 --stored cifar10_c --data-root DIR   # released files
"""

from __future__ import annotations

import argparse

from robustlab.cli.common import DEFAULT_DB, _device, _say, print_run
from robustlab.errors import RobustlabError

SUITES = ("mnist-c", "imagenet-c", "imagenet-c-extra", "all-c")


def _severities(text: str) -> tuple[int, ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.isdigit() or int(part) not in (1, 2, 3, 4, 5):
            raise RobustlabError(f"severity must be 1, 2, 3, 4 or 5, got {part!r}")
        out.append(int(part))
    if not out:
        raise RobustlabError("give at least one severity")
    return tuple(sorted(set(out)))


def corruption_names(text: str | None, image_shape: tuple[int, int, int]) -> list[str]:
    """Names from ``--corruptions`` (names and suites, comma-separated); by default MNIST-C for 28 px
    grey images, else the 15 ImageNet-C corruptions and the 4 extra ones."""
    from robustlab.corruptions import CORRUPTIONS, suite

    if not text:
        text = "mnist-c" if image_shape[0] == 1 and min(image_shape[1:]) <= 28 else "all-c"
    names: list[str] = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        found = suite(part) if part in SUITES else [CORRUPTIONS.get(part).name]
        names += [n for n in found if n not in names]
    return names


def _load_data(args: argparse.Namespace):
    from robustlab.data import load_dataset

    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    data = load_dataset(args.data, args.split, root=args.data_root)
    if args.n:
        if args.n > len(data):
            _say(f"robustlab: note: --n {args.n} is more than the {len(data)} images of {data.name}:{data.split}; "
                 f"using all {len(data)}")
        data = data.subset(args.n)
    return data


def cmd_corrupt(args: argparse.Namespace) -> int:
    if (args.out is None) == (args.model is None):
        raise RobustlabError("give --out DIR (write corrupted files) or --model M (evaluate under corruptions), "
                             "one of them")
    if args.batch_size < 1:
        raise RobustlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    return _write(args) if args.out is not None else _evaluate(args)


def _write(args: argparse.Namespace) -> int:
    from robustlab.corruptions.writer import write_corrupted
    from robustlab.progress import progress

    if args.stored or args.baseline:
        raise RobustlabError("--stored and --baseline are for evaluating (--model), not for writing files")
    data = _load_data(args)
    names = corruption_names(args.corruptions, data.image_shape)
    severities = args.severities
    bar = progress(total=None, desc="corrupting", unit="batch", enabled=args.progress)
    with bar:
        def status(name: str, done: int, total: int) -> None:
            bar.set_postfix_str(f"{name} {done}/{total}")
            bar.update(1)

        written = write_corrupted(data, names, severities, args.out, seed=args.seed, batch_size=args.batch_size,
                                  device=_device(args.device), status=status)
    for path in written.values():
        print(path)
    _say(f"robustlab: {len(written)} corruptions of {len(data)} images in {args.out} (labels.npy and corrupt.json "
         "beside them)")
    return 0


def _baseline(spec: str | None, db: str) -> tuple[str, dict[str, dict[int, float]]] | None:
    """``alexnet`` (published ImageNet-C errors) or a corruption run in the store (id or prefix)."""
    from robustlab.eval.metrics import NAMED_BASELINES, baseline_from_summary
    from robustlab.eval.store import ResultsStore

    if spec is None:
        return None
    if spec.lower() in NAMED_BASELINES:
        return spec.lower(), NAMED_BASELINES[spec.lower()]
    from pathlib import Path

    if not Path(db).is_file():
        raise RobustlabError(f"--baseline {spec!r} is neither {', '.join(NAMED_BASELINES)} nor a run: no results "
                             f"store at {db}")
    with ResultsStore(db) as store:
        run = store.get_run(spec)
    if run["protocol"] != "corruption" or not run.get("summary"):
        raise RobustlabError(f"--baseline run {run['run_id']} is not a finished corruption run")
    return f"run {run['run_id']} ({run['model']})", baseline_from_summary(run["summary"])


def _evaluate(args: argparse.Namespace) -> int:
    from robustlab.cli.eval import apply_card_defenses
    from robustlab.data.corrupted import load_corrupted
    from robustlab.eval.protocols import CorruptionProtocol
    from robustlab.eval.runner import run
    from robustlab.eval.store import ResultsStore
    from robustlab.models import load_model
    from robustlab.report.corruption import format_corruption_summary

    baseline = _baseline(args.baseline, args.db)
    data = _load_data(args)
    if args.stored:
        if args.corruptions and any(p in SUITES for p in args.corruptions.split(",")):
            raise RobustlabError("with --stored, --corruptions names the stored files (e.g. gaussian_noise,fog)")
        names = [p.strip() for p in args.corruptions.split(",")] if args.corruptions else None
        stored = load_corrupted(args.stored, args.data_root, names)
        if args.severities:
            stored.keys = [k for k in stored.keys if k[1] in args.severities]
        protocol = CorruptionProtocol.precorrupted(stored, baseline, with_clean=True)
    else:
        names = corruption_names(args.corruptions, data.image_shape)
        protocol = CorruptionProtocol(names, args.severities, baseline)
        protocol.check_images(data.image_shape)
    device = _device(args.device)
    loaded = load_model(args.model, device=device)
    model = apply_card_defenses(loaded)
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    with ResultsStore(args.db) as store:
        result = run(model, data, protocol, store, seed=args.seed, batch_size=args.batch_size,
                     extra={"classes": list(data.classes)}, model_name=args.model, model_info=info,
                     resume=args.resume, device=device, progress=args.progress, log=_say)
    s = result.summary
    keep = ("model", "dataset", "split", "n", "clean_accuracy", "clean_error", "mean_corruption_error",
            "corruption_accuracy", "errors", "per_corruption", "baseline", "mce", "relative_mce", "seconds")
    return print_run(args, result, format_corruption_summary(s), {k: s.get(k) for k in keep})


def add_parser(sub: argparse._SubParsersAction) -> None:
    from robustlab.cli.common import _argument_type

    c = sub.add_parser("corrupt", help="write a corrupted data set (CIFAR-10-C layout) or evaluate a model under "
                       "common corruptions (error per corruption and severity, mCE)",
                       description="With --out: write DIR/<corruption>.npy (uint8 NHWC, severity-major) and "
                       "DIR/labels.npy, resumably. With --model: evaluate under corruptions generated on the fly "
                       "(or stored ones, --stored) into the results store.")
    c.add_argument("--data", required=True, help="the clean data set, e.g. mnist, cifar10 (see --data-root)")
    c.add_argument("--split", default="test", help="split of --data (default test)")
    c.add_argument("--data-root", help="folder with the data set files, and with --stored's release folder "
                   "(default: $ROBUSTLAB_DATA or ./data)")
    c.add_argument("--n", "--num-examples", dest="n", type=int, help="use the first N images of the split")
    c.add_argument("--corruptions", metavar="LIST",
                   help="comma-separated corruption names and suites (mnist-c, imagenet-c, imagenet-c-extra, all-c); "
                   "default: mnist-c for 28 px grey images, else all-c (the 15 ImageNet-C corruptions and the 4 "
                   "extra ones); with --stored: file names in the stored set (default all)")
    c.add_argument("--severities", type=_argument_type(_severities), metavar="LIST",
                   help="comma-separated severities in 1-5 (default: each corruption's own: 1-5, MNIST-C's 1)")
    c.add_argument("--out", metavar="DIR", help="write the corrupted files here (resumes an unfinished write)")
    c.add_argument("--model", help="evaluate this model (registry name, checkpoint, zoo:NAME or file.py:function)")
    c.add_argument("--stored", metavar="NAME", help="evaluate on a released corrupted set instead of generating: "
                   "cifar10_c, cifar100_c, tiny_imagenet_c, imagenet_c or mnist_c (read from --data-root)")
    c.add_argument("--baseline", metavar="RUN",
                   help="normalize errors by this baseline for CE / mCE: alexnet (published ImageNet-C errors) or "
                   "a finished corruption run in --db (id or unique prefix)")
    c.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random draws (default 0)")
    c.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    c.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    c.add_argument("--db", default=DEFAULT_DB, help=f"results store (SQLite), default {DEFAULT_DB}")
    c.add_argument("--resume", action="store_true", help="continue an unfinished evaluation with the same settings")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout (evaluation)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress (default: when stderr is a terminal)")
    c.set_defaults(func=cmd_corrupt)
