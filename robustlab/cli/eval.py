"""``robustlab eval``: clean and robust accuracy under an attack ensemble, recorded in the results store; for
a segmentation model (its card says task segmentation, or it returns per-pixel logits) mIoU and pixel
accuracy, clean and under the attacks, through the segmentation protocol."""

from __future__ import annotations

import argparse
import warnings
from typing import TYPE_CHECKING, Any

from robustlab.cli.common import (
    _argument_type,
    DATA_HELP,
    DEFAULT_DB,
    _device,
    _floats,
    MODEL_HELP,
    _number,
    print_run,
    rank_store,
    _say,
    _steps_grid,
    _threat,
)
from robustlab.cli.inputs import (
    add_weights_arguments,
    check_data_spec,
    declared_strength,
    load_data_for_model,
)
from robustlab.errors import RobustlabError

if TYPE_CHECKING:
    import torch

    from robustlab.models import LoadedModel


def apply_card_defenses(loaded: LoadedModel, extra: list[str] | None = None) -> torch.nn.Module:
    """The model to evaluate or attack: ``loaded.model`` behind the defenses its card lists, then the
    ``extra`` ones (``--defense`` specs), in order; ``loaded.model`` itself when there are none."""
    from robustlab.defenses import apply_defenses

    return apply_defenses(loaded.model, [*loaded.defense, *(extra or [])])


def cmd_eval(args: argparse.Namespace) -> int:
    from robustlab import distributed
    from robustlab.attacks import build_attacks
    from robustlab.predictor import is_randomized
    from robustlab.data.image_folder import data_fingerprint
    from robustlab.eval.runner import EvalOptions, evaluate
    from robustlab.models import load_model
    from robustlab.models.dual_bn import current_bn_branch
    from robustlab.report.text import format_summary

    from robustlab.defenses import build_defenses

    threat = _threat(args.norm, args.eps)
    attacks = build_attacks(args.attack or ["pgd"], threat)
    build_defenses(args.defense or [])  # bad names or parameters fail before anything is loaded
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    check_data_spec(args.data)
    device = _device(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(args.model, device=device, bn_branch=args.bn, weights=args.weights,
                            num_classes=args.num_classes)
    for w in caught:
        _say(f"robustlab: warning: {w.message}")
    data = load_data_for_model(args.data, args.split, args.data_root, loaded.card)
    if args.n:
        if args.n > len(data):
            _say(f"robustlab: note: --n {args.n} is more than the {len(data)} images of {data.name}:{data.split}; "
                 f"using all {len(data)}")
        data = data.subset(args.n)
    loaded.model.to(device)
    model = apply_card_defenses(loaded, args.defense)
    if is_randomized(model):  # AutoAttack's advice: the rand version for randomized defenses
        specs = args.attack or ["pgd"]
        attacks = build_attacks(specs, threat, randomized=True)
        if "standard" in specs:
            _say("robustlab: note: the model's predictions are randomized: the standard suite runs as 'rand' "
                 "(APGD-CE and APGD-DLR with EOT over 20 draws)")
    if is_segmentation(loaded, model, data, device):
        return _eval_segmentation(args, loaded, model, data, attacks, device)
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    extra: dict[str, Any] = {"classes": list(data.classes)}
    fingerprint = data_fingerprint(data)
    if fingerprint is not None:  # an image folder: which files, so runs on other folders are not compared
        extra["data_fingerprint"] = fingerprint
    if args.stronger_than:  # recorded in the config: the leaderboard ranks the run with full evaluations
        extra["declared_strength"] = args.stronger_than
    branch = current_bn_branch(model)
    if branch is not None:  # a dual-BN model: which branch was evaluated is part of the run
        info["bn_branch"] = extra["bn_branch"] = branch
    options = EvalOptions(
        eps_grid=tuple(args.eps_grid or ()),
        steps_grid=args.steps_grid,
        seed=args.seed,
        batch_size=args.batch_size,
        sanity=not args.no_sanity,
        reuse=args.reuse_curve,
        extra=extra,
    )
    # Under torchrun: every rank attacks its share of the batches; rank 0 owns the store and prints.
    with rank_store(args.db) as store:
        result = evaluate(model, data, attacks, store, model_name=args.model, model_info=info, options=options,
                          resume=args.resume, device=device, log=_say)
    if not distributed.is_main():
        return 0
    s = result.summary
    fields = {
        "model": args.model,
        "dataset": data.name,
        "split": data.split,
        "n": s["n"],
        "threat": s["threat"],
        "clean_accuracy": s["clean_accuracy"],
        "robust_accuracy": s["robust_accuracy"],
        "ensemble_robust_accuracy": s["ensemble_robust_accuracy"],
        "ci95": s["ci95"],
        "defenses": s.get("defenses", []),
        "attacks": [
            {k: a[k] for k in ("name", "params", "robust_accuracy", "seconds", "broken", "gradients", "forwards")}
            for a in s["attacks"]
        ],
        "eps_curve": s["eps_curve"],
        "steps_curve": s["steps_curve"],
        "checks": result.checks,
        "seconds": s["seconds"],
    }
    return print_run(args, result, format_summary(s, result.checks), fields)


def is_segmentation(loaded: LoadedModel, model: torch.nn.Module, data: Any, device: Any) -> bool:
    """Whether ``robustlab eval`` runs the segmentation protocol: the model card says task
    segmentation, or (no card says) the model returns per-pixel logits (N, classes, H, W) on the
    first image of the data."""
    import torch

    from robustlab.models.runtime import eval_mode

    if loaded.card is not None and loaded.card.task == "segmentation":
        return True
    x, _ = data.batch(range(1))
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x.to(device))
    except Exception:  # noqa: BLE001 - the runner's probe gives the clear error for models that fail
        return False
    return isinstance(out, torch.Tensor) and out.dim() == 4


def _eval_segmentation(args: argparse.Namespace, loaded: LoadedModel, model: torch.nn.Module, data: Any,
                       attacks: list[Any], device: Any) -> int:
    """``robustlab eval`` of a segmentation model: the segmentation protocol (mIoU and pixel accuracy,
    clean and under the attacks on the per-pixel loss)."""
    from robustlab import distributed
    from robustlab.eval.runner import segment
    from robustlab.report.segmentation import format_segmentation_summary

    given = [flag for flag, on in (("--steps-grid", args.steps_grid is not None), ("--reuse-curve", args.reuse_curve),
                                   ("--stronger-than", bool(args.stronger_than)), ("--bn", bool(args.bn)))
             if on]
    if given:
        raise RobustlabError(f"{', '.join(given)} apply to classifiers; {args.model} is a segmentation model")
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None,
            "task": "segmentation"}
    extra = {"data": data.describe} if getattr(data, "describe", None) else {}
    with rank_store(args.db) as store:  # under torchrun as cmd_eval
        result = segment(model, data, attacks, store, eps_grid=tuple(args.eps_grid or ()), seed=args.seed,
                         batch_size=args.batch_size, extra=extra, model_name=args.model, model_info=info,
                         resume=args.resume, device=device, log=_say)
    if not distributed.is_main():
        return 0
    return print_run(args, result, format_segmentation_summary(result.summary, result.checks),
                     {**result.summary, "checks": result.checks})


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate clean and robust accuracy under an attack ensemble (segmentation "
                       "models: mIoU and pixel accuracy)")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    add_weights_arguments(e)
    e.add_argument("--data", required=True, help=DATA_HELP)
    e.add_argument("--split", default="test")
    e.add_argument("--data-root")
    e.add_argument("--n", "--num-examples", dest="n", type=int,
                   help="evaluate the first N examples of the split, in order (under torchrun, whose own "
                   "parser takes --n for its --nnodes, write --num-examples)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--norm", required=True)
    e.add_argument("--eps", required=True, type=_argument_type(_number))
    e.add_argument("--eps-grid", type=_argument_type(_floats), help="comma-separated epsilons for the robustness curve")
    e.add_argument("--steps-grid", type=_argument_type(_steps_grid), default=None,
                   help="strengths (iterations, or queries for black-box attacks) for the attack-strength curve "
                   "of the first attack that has one (auto, none, or 1,5,10)")
    e.add_argument("--attack", action="append", metavar="NAME[:key=value,...]",
                   help="attack to run (repeat for an ensemble, run in order), a suite (standard, rand; standard runs "
                   "as rand on a randomized defense), or an ensemble file (.txt: one spec per line, .json: a list); "
                   "default pgd")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--db", default=DEFAULT_DB)
    e.add_argument("--resume", action="store_true", help="continue an unfinished run with the same configuration")
    e.add_argument("--no-sanity", action="store_true", help="skip the gradient-masking sanity checks")
    e.add_argument("--defense", action="append", metavar="NAME[:key=value,...]",
                   help="evaluate the model behind this defense (repeat: applied in order, after any its card "
                   "lists); attacks are made adaptive to it (BPDA, EOT over its draws)")
    e.add_argument("--reuse-curve", action="store_true",
                   help="epsilon-curve points count as broken what a smaller ball already broke, and minimum-norm "
                   "attacks give the curve from their per-sample norms (fewer attacks; off by default)")
    e.add_argument("--bn", choices=["clean", "adv"],
                   help="for a model with dual batch norm: evaluate this branch (default: the card's test_branch)")
    e.add_argument("--stronger-than", metavar="SUITE: WHY", type=_argument_type(declared_strength),
                   help="declare this attack list at least as strong as a suite (standard, rand) and say why, e.g. "
                   "'standard: the paper's adaptive attack, 1000 steps'; the leaderboard then ranks the run among full "
                   "evaluations (with the reason shown) although it does not run that suite")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=cmd_eval)
