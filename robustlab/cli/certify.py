"""``robustlab certify``: certified robustness of a model, recorded in the results store.

``--method`` picks how certificates are made; each method is one entry of :data:`METHODS` (a
function from the parsed arguments to the run's result): ``smoothing`` (randomized smoothing:
``--noise``, ``--sigma``, ``--n0``, ``--n``, ``--alpha``), ``ibp`` and ``crown-ibp`` (verified bounds by
bound propagation: ``--eps``, ``--norm``).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import Any

from robustlab.cli.common import (
    add_model_data_options,
    add_store_options,
    _argument_type,
    _device,
    _floats,
    load_data,
    load_model_on,
    _number,
    print_run,
    _say,
)
from robustlab.errors import RobustlabError

NOISE_CHOICES = ("gaussian", "laplace", "uniform", "ablation")
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
ABLATION_RADII = (0.0, 1.0, 2.0, 5.0, 10.0)  # pixels


def _smoothing(args: argparse.Namespace, model, data, store, device, info: dict[str, Any]):
    from robustlab.certify import SmoothingWarning, too_few_draws
    from robustlab.eval.protocols import CertifiedOptions
    from robustlab.eval.runner import certify

    if args.noise == "ablation":
        if args.keep is None:
            raise RobustlabError("--noise ablation needs --keep K (pixels kept per draw)")
        params: dict[str, Any] = {"keep": args.keep, "fill": args.fill}
    else:
        if args.sigma is None:
            raise RobustlabError(f"--noise {args.noise} needs --sigma S (noise standard deviation in [0, 1] pixel units)")
        if not args.sigma > 0:
            raise RobustlabError(f"--sigma must be > 0, got {args.sigma:g}")
        params = {"sigma": args.sigma}
    if not 0.0 < args.alpha < 1.0:
        raise RobustlabError(f"--alpha must be in (0, 1) (the failure probability), got {args.alpha:g}")
    if args.n0 > args.n:
        raise RobustlabError(f"--n0 ({args.n0}) must not exceed --n ({args.n}): n0 draws select the class, n estimate it")
    message = too_few_draws(args.n, args.alpha)
    if message:
        _say(f"robustlab: warning: {message}")
    options = CertifiedOptions(
        noise=args.noise, noise_params=params, n0=args.n0, n=args.n, alpha=args.alpha, noise_batch=args.noise_batch,
        radii=tuple(args.radii if args.radii is not None else ABLATION_RADII if args.noise == "ablation" else RADII),
        attack_n=0 if args.no_attack_check else args.attack_n,
        attack_steps=args.attack_steps, attack_draws=args.attack_draws, attack_radius=args.attack_radius,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmoothingWarning)
        return certify(model, data, options, store, seed=args.seed, batch_size=args.batch_size, model_name=args.model,
                       model_info=info, resume=args.resume, device=device, log=_say)


def _verified(args: argparse.Namespace, model, data, store, device, info: dict[str, Any]):
    from robustlab.eval.protocols.verified import run_from_args

    if args.eps is None:
        raise RobustlabError(f"--method {args.method} needs --eps E (radius of the {args.norm} ball, [0, 1] pixel units)")
    steps = 0 if args.no_attack_check else args.attack_steps
    return run_from_args(argparse.Namespace(**{**vars(args), "attack_steps": steps}), model, data, store, device, info)


# --method NAME -> the function that runs it: (args, model, data, store, device, model_info) -> RunResult
METHODS: dict[str, Callable[..., Any]] = {"smoothing": _smoothing, "ibp": _verified, "crown-ibp": _verified}


def cmd_certify(args: argparse.Namespace) -> int:
    from robustlab.eval.store import ResultsStore
    from robustlab.report.text import format_certified

    if args.method not in METHODS:
        raise RobustlabError(f"unknown --method {args.method!r}; known: {', '.join(METHODS)}")
    data = load_data(args)
    device = _device(args.device)
    loaded = load_model_on(args.model, device)
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    with ResultsStore(args.db) as store:
        result = METHODS[args.method](args, loaded.model, data, store, device, info)
    s = result.summary
    if s.get("protocol") == "verified":
        return _print_verified(args, data, result)
    keys = ("method", "noise", "norm", "n", "settings", "certified_accuracy", "acr", "abstain_rate", "ci95",
            "lie_check", "empirical")
    fields = {"model": args.model, "dataset": data.name, "split": data.split, **{k: s[k] for k in keys},
              "checks": result.checks, "seconds": s["seconds"]}
    return print_run(args, result, format_certified(s, result.checks, f"{args.model} on {data.name}:{data.split}"),
                     fields)


def _print_verified(args: argparse.Namespace, data, result) -> int:
    from robustlab.report.verified import format_verified

    s = result.summary
    keys = ("method", "threat", "n", "clean_accuracy", "verified_accuracy", "empirical_robust_accuracy", "gap",
            "lies", "ci95", "median_margin_lower", "soundness_attack")
    fields = {"model": args.model, "dataset": data.name, "split": data.split, **{k: s.get(k) for k in keys},
              "certified_accuracy": {f"{s['threat']['eps']:g}": s["verified_accuracy"]}, "checks": result.checks}
    return print_run(args, result, format_verified(s, result.checks, f"{args.model} on {data.name}:{data.split}"),
                     fields)


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("certify", help="certified robustness (randomized smoothing, IBP, CROWN-IBP) into the results store")
    add_model_data_options(c, samples_flag="--samples")
    c.add_argument("--method", default="smoothing", choices=sorted(METHODS),
                   help="how certificates are made (default smoothing: randomized smoothing; ibp, crown-ibp: verified "
                   "bounds by interval / CROWN-IBP bound propagation at --eps)")
    c.add_argument("--eps", type=_argument_type(_number),
                   help="ibp, crown-ibp: radius of the ball to verify, in [0, 1] pixel units (e.g. 0.1 or 2/255)")
    c.add_argument("--norm", default="linf", choices=("linf", "l2"), help="ibp, crown-ibp: the ball's norm (default linf)")
    c.add_argument("--noise", default="gaussian", choices=NOISE_CHOICES,
                   help="smoothing noise: gaussian (L2 radii), laplace or uniform (L1), ablation (L0, in pixels)")
    c.add_argument("--sigma", type=_argument_type(_number),
                   help="noise standard deviation per pixel in [0, 1] units (gaussian, laplace, uniform)")
    c.add_argument("--keep", type=int, help="ablation: pixels kept per draw (the others set to --fill)")
    c.add_argument("--fill", type=float, default=0.0, help="ablation: value of ablated pixels (default 0)")
    c.add_argument("--n", type=int, default=1000, help="draws per image to estimate the top class's probability (default 1000)")
    c.add_argument("--n0", type=int, default=100, help="draws per image to select the top class (default 100)")
    c.add_argument("--alpha", type=float, default=0.001,
                   help="failure probability of each certificate (default 0.001)")
    c.add_argument("--noise-batch", type=int, default=400, help="noisy images per forward pass (default 400)")
    c.add_argument("--batch-size", type=int, default=16, help="images per stored batch, the unit of resume (default 16)")
    c.add_argument("--radii", type=_argument_type(_floats),
                   help="radii at which certified accuracy is reported (default 0,0.25,0.5,0.75,1; ablation: "
                   "0,1,2,5,10 pixels)")
    c.add_argument("--attack-n", type=int, default=100,
                   help="the first N images get the attack check: certificates attacked inside their radius, and "
                   "empirical accuracy at --attack-radius (default 100)")
    c.add_argument("--attack-steps", type=int, default=20,
                   help="PGD steps of the attack check (default 20; ibp, crown-ibp attack every correct image at --eps)")
    c.add_argument("--attack-draws", type=int, default=8,
                   help="noise draws per step in the attacked soft smoothed classifier (default 8)")
    c.add_argument("--attack-radius", type=float, default=0.5, help="radius of the empirical accuracy (default 0.5)")
    c.add_argument("--no-attack-check", action="store_true", help="skip the attack check")
    add_store_options(c)
    c.set_defaults(func=cmd_certify)
