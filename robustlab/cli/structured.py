"""``robustlab structured``: threat models that are not an Lp ball around each image (spatial
transformations, universal perturbations, adversarial patches), each evaluated as its own threat model
into the results store (``robustlab.eval.protocols.structured``).

Its own command rather than ``eval --threat``: these threat models have their own attacks and
numbers (fooling rate, random- and worst-position accuracy), universal perturbations and patches are
fitted on training images first, and none of eval's ensemble, curve or defense options apply.

Universal perturbations and patches are fitted once per run on the first ``--fit-n`` images of the
data set's training split (seeded) and kept with the run, so a ``--resume`` reuses them.
"""

from __future__ import annotations

import argparse

from robustlab.cli.common import (
    _device,
    _say,
    add_model_data_options,
    add_store_options,
    first_samples,
    load_model_on,
    print_run,
    rank_store,
)
from robustlab.cli.inputs import check_data_spec, load_data_for_model
from robustlab.errors import RobustlabError


def cmd_structured(args: argparse.Namespace) -> int:
    from robustlab import distributed
    from robustlab.data.image_folder import data_fingerprint
    from robustlab.eval.protocols.structured import StructuredProtocol, parse_threat
    from robustlab.eval.runner import run

    threats = [parse_threat(spec) for spec in args.threat]  # bad specs fail before anything is loaded
    if args.fit_n < 1:
        raise RobustlabError(f"--fit-n must be >= 1 (universal perturbations and patches are fitted on that many "
                             f"training images), got {args.fit_n}")
    if args.samples is not None and args.samples < 1:
        raise RobustlabError(f"the number of images must be >= 1, got {args.samples}")
    check_data_spec(args.data)
    device = _device(args.device)
    loaded = load_model_on(args.model, device)
    data = first_samples(load_data_for_model(args.data, args.split, args.data_root, loaded.card), args.samples)
    fit, source = None, ""
    fitting = [t.name for t in threats if t.fits]
    if fitting:
        try:
            train = load_data_for_model(args.data, "train", args.data_root, loaded.card)
        except RobustlabError as exc:
            raise RobustlabError(f"{fitting[0]} is fitted on training images, but {args.data} has no train split to "
                                 f"read them from ({exc})") from None
        k = min(args.fit_n, len(train))
        if k < args.fit_n:
            _say(f"robustlab: note: --fit-n {args.fit_n} asked for, but {train.name}:train has {len(train)} images; "
                 f"fitting on all {k}")
        fit, source = train.batch(range(k)), f"{train.name}:train[0:{k}]"
    protocol = StructuredProtocol(threats, tuple(data.image_shape), fit, source)  # image-size checks
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    extra = {"classes": list(data.classes)}
    fingerprint = data_fingerprint(data)
    if fingerprint is not None:  # an image folder: which files, so runs on other folders are not compared
        extra["data_fingerprint"] = fingerprint
    # Under torchrun: every rank evaluates its share of the batches; rank 0 fits, owns the store and prints.
    with rank_store(args.db) as store:
        result = run(loaded.model.eval(), data, protocol, store, seed=args.seed, batch_size=args.batch_size,
                     examples=0, extra=extra, model_name=args.model, model_info=info, resume=args.resume,
                     device=device, log=_say)
    if not distributed.is_main():
        return 0
    from robustlab.report.structured import format_structured

    s = result.summary
    fields = {"model": args.model, "dataset": data.name, "split": data.split,
              **{k: s.get(k) for k in ("n", "clean_accuracy", "robust_accuracy", "threats", "fit", "seconds")},
              "checks": result.checks}
    return print_run(args, result, format_structured(s, result.checks, f"{args.model} on {data.name}:{data.split}"),
                     fields)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from robustlab.eval.protocols.structured import threat_help

    p = sub.add_parser("structured", help="evaluate under spatial transformations, a universal perturbation or an "
                       "adversarial patch, each as its own threat model")
    add_model_data_options(p)
    p.add_argument("--threat", action="append", required=True, metavar="KIND[:key=value,...]",
                   help="a threat model, one task of the run each (repeat for several): " + threat_help().replace(
                       "%", "%%") + ". spatial: rotations up to angle degrees and shifts up to shift pixels, worst "
                   "case over a grid of angles x shifts x shifts and first-order ascent (steps, restarts); "
                   "universal: one perturbation of norm <= eps for every image (uap: epochs, batch_size, alpha: "
                   "its step, auto eps/10); "
                   "patch: a size x size patch anywhere (epochs, batch_size, lr of its fit; worst position on a "
                   "grid of stride; draws random positions per image)")
    p.add_argument("--fit-n", type=int, default=1000,
                   help="universal perturbations and patches are fitted on the first N images of the training split "
                   "(default 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="images per stored batch, the unit of resume (default 128)")
    add_store_options(p)
    p.set_defaults(func=cmd_structured)
