"""``robustlab detect``: a classifier guarded by an adversarial-example detector, evaluated into the
results store (``robustlab.eval.protocols.detection``).

Its own command rather than ``eval --detector``: a detection run fits the detector on training images,
fixes its threshold on other clean images at a false-positive rate, and runs a fixed pair of attacks
(plain PGD and the detector-aware attack), so none of eval's ensemble, curve or defense options apply,
and it needs options eval has no use for (fit and calibration sizes, the false-positive rate, the
adaptive attack's budget). One protocol, one command, as ``certify`` and ``corrupt``.

The detector is fitted on the first ``--fit-n`` images of the model's training split (seeded) and its
threshold fixed on the next ``--calibration-n``; neither set overlaps the evaluated test images. The
fitted state is kept in the store, so ``--resume`` loads it rather than fitting again.
"""

from __future__ import annotations

import argparse

from robustlab.cli.common import (
    add_model_data_options,
    add_store_options,
    _argument_type,
    _device,
    load_data,
    load_model_on,
    _number,
    print_run,
    rank_store,
    _say,
    _threat,
)
from robustlab.errors import RobustlabError


def cmd_detect(args: argparse.Namespace) -> int:
    from robustlab.attacks.detector_aware import DetectorAwareOptions
    from robustlab.data import load_dataset
    from robustlab.defenses.detection import build_detector
    from robustlab.eval.protocols.detection import (
        DetectionOptions,
        DetectionProtocol,
        DetectorData,
    )
    from robustlab.eval.runner import run
    from robustlab import distributed
    from robustlab.report.detection import format_detection

    threat = _threat(args.norm, args.eps)
    detector = build_detector(args.detector)  # bad names or parameters fail before anything is loaded
    if not 0 < args.fpr < 1:
        raise RobustlabError(f"--fpr must be in (0, 1) (a false-positive rate), got {args.fpr:g}")
    if args.fit_n < 1 or args.calibration_n < 20:
        raise RobustlabError("--fit-n must be >= 1 and --calibration-n >= 20 (the threshold is a quantile of their "
                             "clean scores)")
    adaptive = None if args.no_adaptive else DetectorAwareOptions(steps=args.adaptive_steps, rounds=args.adaptive_rounds)
    options = DetectionOptions(pgd_steps=args.pgd_steps, adaptive=adaptive)
    data = load_data(args)
    device = _device(args.device)
    loaded = load_model_on(args.model, device)
    train = load_dataset(args.data, "train", root=args.data_root)
    need = args.fit_n + args.calibration_n
    if len(train) < need:
        raise RobustlabError(f"{data.name}:train has {len(train)} images; --fit-n {args.fit_n} + --calibration-n "
                             f"{args.calibration_n} need {need}")
    x_fit, y_fit = train.batch(range(args.fit_n))
    x_cal, _ = train.batch(range(args.fit_n, need))
    model = loaded.model.eval()
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    fitting = DetectorData(x_fit, y_fit, x_cal, args.fpr, f"{data.name}:train[0:{args.fit_n}]",
                           f"{data.name}:train[{args.fit_n}:{need}]")
    protocol = DetectionProtocol(detector, threat, fitting, options)
    # Under torchrun: rank 0 fits the detector and owns the store; every rank runs its share of the batches.
    with rank_store(args.db) as store:
        result = run(model, data, protocol, store, seed=args.seed, batch_size=args.batch_size, examples=0,
                     extra={"classes": list(data.classes)}, model_name=args.model, model_info=info,
                     resume=args.resume, device=device, log=_say)
    if not distributed.is_main():
        return 0
    s = result.summary
    keys = ("n", "threat", "detector", "fpr", "threshold", "clean_accuracy", "clean_flag_rate", "robust_accuracy",
            "non_adaptive", "undefended_robust_accuracy", "auc", "detection_rate", "adaptive_auc",
            "adaptive_detection_rate", "attacks", "ci95", "seconds")
    fields = {"model": args.model, "dataset": data.name, "split": data.split, **{k: s.get(k) for k in keys},
              "checks": result.checks}
    return print_run(args, result, format_detection(s, result.checks, f"{args.model} on {data.name}:{data.split}"),
                     fields)


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("detect", help="evaluate a classifier guarded by an adversarial-example detector (threshold "
                       "fixed on clean images; plain PGD and the detector-aware attack)")
    add_model_data_options(d)
    d.add_argument("--detector", required=True, metavar="NAME[:key=value,...]",
                   help="the detector: squeeze (bits, median), mahalanobis (shrinkage), lid (k, reference, noise), "
                   "magnet (width, steps, lr, noise), e.g. squeeze:bits=1,median=2")
    d.add_argument("--norm", required=True)
    d.add_argument("--eps", required=True, type=_argument_type(_number))
    d.add_argument("--fpr", type=float, default=0.05,
                   help="false-positive rate on clean calibration images that fixes the threshold (default 0.05)")
    d.add_argument("--fit-n", type=int, default=2000,
                   help="the detector is fitted on the first N training images (default 2000)")
    d.add_argument("--calibration-n", type=int, default=1000,
                   help="the threshold is fixed on the next N training images, clean (default 1000)")
    d.add_argument("--pgd-steps", type=int, default=40, help="steps of the plain (detector-unaware) PGD (default 40)")
    d.add_argument("--adaptive-steps", type=int, default=200,
                   help="steps per round of the detector-aware attack (default 200)")
    d.add_argument("--adaptive-rounds", type=int, default=5,
                   help="rounds of the detector-aware attack's per-sample trade-off search (default 5)")
    d.add_argument("--no-adaptive", action="store_true",
                   help="run plain PGD only (the leaderboard then marks the run as weaker: the detector is never "
                   "attacked)")
    d.add_argument("--batch-size", type=int, default=128, help="images per stored batch, the unit of resume (default 128)")
    add_store_options(d)
    d.set_defaults(func=cmd_detect)
