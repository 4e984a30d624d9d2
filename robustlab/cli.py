"""The ``robustlab`` command: parse, build objects from registries, call the library.

Problems the user can fix print one line ``robustlab: error: ...`` and exit with status 2; no
traceback (set ROBUSTLAB_DEBUG=1 to see one for unexpected errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from robustlab.errors import RobustlabError

DEFAULT_DB = "results.db"


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


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from robustlab import distributed
    from robustlab.params import parse_spec as parse_attack_spec
    from robustlab.data import load_dataset
    from robustlab.models import ModelCard, convert_to_dual_bn, create_model, save_checkpoint, set_bn_branch
    from robustlab.threat import ThreatModel
    from robustlab.training import (
        OBJECTIVES, TrainConfig, accuracy, cpu_has_bf16, create_objective, load_unlabeled, split_holdout, train,
    )

    # Under torchrun: data-parallel training, every rank holds the same weights; rank 0 writes and prints.
    distributed.init_from_env()
    say = _say if distributed.is_main() else (lambda msg: None)
    name, params = parse_attack_spec(args.recipe)
    recipe = OBJECTIVES.get(name)
    threat = ThreatModel(args.norm, args.eps) if args.eps is not None else None
    if recipe.adversarial and threat is None:
        raise RobustlabError(f"recipe {name!r} trains against a threat model: give --eps (and --norm, default linf)")
    _check_train_flags(args, name, recipe)
    objective = create_objective(name, threat, **params)
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    device = _device(args.device)
    if args.amp and device.type == "cpu" and cpu_has_bf16() is False:
        say("robustlab: warning: --amp on this CPU means bfloat16 without hardware support (no AVX512-BF16 "
            "or AMX): usually slower than float32; leave --amp out")
    data = load_dataset(args.data, "train", root=args.data_root)
    test = load_dataset(args.data, "test", root=args.data_root)
    if args.n:
        data = data.subset(args.n)
    unlabeled = None
    if args.unlabeled:
        fraction = 0.5 if args.unlabeled_fraction is None else args.unlabeled_fraction
        unlabeled = load_unlabeled(args.unlabeled, data, fraction, root=args.data_root)
    # Held-out validation: by default 10% of the training data (at most 256 images) when there is a
    # threat model to validate against, none otherwise (plain standard training stays as it was).
    val_n = args.val_n if args.val_n is not None else (min(256, len(data) // 10) if threat is not None else 0)
    val_data = None
    if val_n:
        data, val_data = split_holdout(data, val_n, args.seed)
    co = {"auto": None, "on": True, "off": False}[args.co_detection]
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed, warmup_epochs=args.warmup_epochs,
        milestones=tuple(args.milestones), gamma=args.gamma, grad_clip=args.grad_clip, ema_decay=args.ema,
        val_n=val_n, val_steps=args.val_steps, patience=args.patience, restore_best=not args.no_restore_best,
        co_detection=co, amp=args.amp, channels_last=args.channels_last,
    )
    out = Path(args.out)
    state_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + ".train")
    what = f"{name} ({', '.join(f'{k}={v}' for k, v in objective.params.items())})" if objective.params else name
    say(f"{'resuming' if args.resume else 'training'} {args.model} on {data.name} ({len(data)} images"
         f"{f', {val_n} held out for validation' if val_n else ''}"
         f"{f'; {len(unlabeled)} unlabeled from {unlabeled.name}' if unlabeled is not None else ''}) with {what}"
         f"{f' at {threat}' if threat else ''} for {args.epochs} epochs on {device}; state in {state_dir}")

    def report(r: dict[str, Any]) -> None:
        val = ""
        if "val_clean_acc" in r:
            val = f", val clean {100 * r['val_clean_acc']:.1f}%"
            if "val_robust_acc" in r:
                val += f" pgd {100 * r['val_robust_acc']:.1f}%"
        say(f"  epoch {r['epoch']}: loss {r['loss']:.4f}{val} ({r['seconds']:.1f}s)")

    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.image_shape[0])
    dual_bn = None
    if recipe.needs_dual_bn:  # clean and adversarial BatchNorm branches; validation and test use --bn's
        dual_bn = {"test_branch": args.bn or "clean"}
        set_bn_branch(convert_to_dual_bn(model), dual_bn["test_branch"])
    t0 = time.perf_counter()
    history = train(model, data, config, objective, device=device, on_epoch=report, val_data=val_data,
                    threat=threat, checkpoint_dir=state_dir, resume=args.resume, unlabeled=unlabeled)
    seconds = time.perf_counter() - t0
    if not distributed.is_main():
        return 0
    summary = history.summary
    if summary.get("catastrophic_overfitting"):
        _say(f"robustlab: warning: {summary['catastrophic_overfitting']['message']}")
    elif summary.get("stop_reason") == "early_stopping":
        _say(f"stopped early: no better validation accuracy for {args.patience} epochs")
    if summary.get("restored_best_epoch"):
        _say(f"restored the weights of epoch {summary['restored_best_epoch']} (best on the validation set)")

    def card_for(net: torch.nn.Module, val: dict[str, float], extra: dict[str, Any]) -> tuple[ModelCard, float]:
        acc = accuracy(net, test, device=device)
        validation = None
        if val_n:
            validation = {"n": val_n, "held_out_from": f"{data.name}:train (seed {args.seed})",
                          "attack": {"name": "pgd", "steps": args.val_steps} if threat else None,
                          "clean_accuracy": val.get("clean_acc"), "robust_accuracy": val.get("robust_acc")}
        robust = {f"{threat.norm}:{threat.eps:g}": val["robust_acc"]} if threat and "robust_acc" in val else None
        card = ModelCard.for_architecture(
            args.model,
            num_classes=data.num_classes,
            in_channels=data.image_shape[0],
            dataset=f"{data.name}:train[{len(data)}]",
            training={"recipe": name, "recipe_params": objective.config()["params"],
                      "threat": threat.to_dict() if threat else None, **config.to_dict(),
                      "seconds": round(seconds, 1), "resumed": bool(args.resume), "history": list(history),
                      "summary": summary, "validation": validation,
                      **({"unlabeled": {"spec": args.unlabeled, **unlabeled.describe()}} if unlabeled else {}),
                      **extra},
            clean_accuracy=acc,
            dual_bn=dual_bn,
            robust_accuracy=robust,
            notes=f"clean accuracy measured on {test.name}:test ({len(test)} images)"
            + (f"; robust accuracy: PGD-{args.val_steps} on the {val_n} held-out training images" if robust else ""),
        )
        return card, acc

    card, acc = card_for(model, summary.get("final_val", {}), {})
    path = save_checkpoint(model.cpu(), out, card)
    _say(f"clean test accuracy {100 * acc:.2f}% after {seconds:.1f}s")
    print(path)
    if history.ema is not None:
        ema_card, ema_acc = card_for(history.ema, summary.get("ema_val", {}), {"weights": "ema"})
        ema_path = save_checkpoint(history.ema.cpu(), out.with_name(out.stem + "_ema.safetensors"), ema_card)
        _say(f"weight average (EMA): clean test accuracy {100 * ema_acc:.2f}%")
        print(ema_path)
    return 0


def _check_train_flags(args: argparse.Namespace, name: str, recipe: Any) -> None:
    """Flags that only some recipes take: refuse them elsewhere, and require what a recipe needs."""
    if args.unlabeled and not recipe.uses_unlabeled:
        raise RobustlabError(f"--unlabeled: recipe {name!r} does not train on unlabeled data (use rst or uat)")
    if recipe.uses_unlabeled and not args.unlabeled:
        raise RobustlabError(f"recipe {name!r} trains on extra unlabeled images: give --unlabeled NAME[:SPLIT] or a folder")
    if args.unlabeled_fraction is not None and not args.unlabeled:
        raise RobustlabError("--unlabeled-fraction needs --unlabeled")
    if args.bn is not None and not recipe.needs_dual_bn:
        raise RobustlabError(f"--bn chooses a branch of dual batch norm, which recipe {name!r} does not train (use dual-bn)")


# ---------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from robustlab import distributed
    from robustlab.attacks import build_attacks
    from robustlab.report.plots import wilson_interval
    from robustlab.eval.runner import EvalOptions, evaluate
    from robustlab.eval.store import ResultsStore
    from robustlab.data import load_dataset
    from robustlab.models import load_model
    from robustlab.models.dual_bn import current_bn_branch
    from robustlab.threat import ThreatModel

    threat = ThreatModel(args.norm, args.eps)
    attacks = build_attacks(args.attack or ["pgd"], threat)
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    data = load_dataset(args.data, args.split, root=args.data_root)
    if args.n:
        data = data.subset(args.n)
    device = _device(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(args.model, device=device, bn_branch=args.bn)
    for w in caught:
        _say(f"robustlab: warning: {w.message}")
    model = loaded.model.to(device)
    info = {"source": loaded.source, "spec": args.model, "card": loaded.card.to_dict() if loaded.card else None}
    extra: dict[str, Any] = {"classes": list(data.classes)}
    branch = current_bn_branch(model)
    if branch is not None:  # a dual-BN model: which branch was evaluated is part of the run
        info["bn_branch"] = extra["bn_branch"] = branch
    options = EvalOptions(
        eps_grid=tuple(args.eps_grid or ()),
        steps_grid=args.steps_grid,
        seed=args.seed,
        batch_size=args.batch_size,
        sanity=not args.no_sanity,
        extra=extra,
    )
    # Under torchrun: every rank attacks its share of the batches; rank 0 owns the store and prints.
    distributed.init_from_env()
    store = ResultsStore(args.db) if distributed.is_main() else None
    try:
        result = evaluate(model, data, attacks, store, model_name=args.model, model_info=info, options=options,
                          resume=args.resume, device=device, log=_say)
    finally:
        if store is not None:
            store.close()
    if not distributed.is_main():
        return 0
    s = result.summary
    if args.json:
        out = {
            "run_id": result.run_id,
            "db": str(Path(args.db)),
            "resumed": result.resumed,
            "model": args.model,
            "dataset": data.name,
            "split": data.split,
            "n": s["n"],
            "threat": s["threat"],
            "clean_accuracy": s["clean_accuracy"],
            "robust_accuracy": s["robust_accuracy"],
            "ci95": {k: wilson_interval(s[f"{k}_accuracy"], s["n"]) for k in ("clean", "robust")},
            "attacks": [
                {k: a[k] for k in ("name", "params", "robust_accuracy", "seconds", "broken", "gradients", "forwards")}
                for a in s["attacks"]
            ],
            "eps_curve": s["eps_curve"],
            "steps_curve": s["steps_curve"],
            "checks": result.checks,
            "seconds": s["seconds"],
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_summary(s, result.checks))
        print(f"run {result.run_id} in {args.db}; `robustlab report {result.run_id} --db {args.db}` writes the report")
    return 0


def format_summary(s: dict[str, Any], checks: list[dict[str, str]]) -> str:
    from robustlab.report.plots import ci_text

    lines = [
        f"{s['model']} on {s['dataset']}:{s['split']} (n={s['n']}), {s['threat']['norm']} eps={s['threat']['eps']:g}",
        f"  clean accuracy   {100 * s['clean_accuracy']:6.2f}%   ({ci_text(s['clean_accuracy'], s['n'])})",
    ]
    for a in s["attacks"]:
        lines.append(f"  after {a['name']:<10} {100 * a['robust_accuracy']:6.2f}%   ({a['broken']} broken, {a['seconds']:.2f}s)")
    lines.append(f"  robust accuracy  {100 * s['robust_accuracy']:6.2f}%   ({ci_text(s['robust_accuracy'], s['n'])})")
    if len(s["eps_curve"]) > 2:
        lines.append("  eps curve: " + ", ".join(f"{p['eps']:g}: {100 * p['robust_accuracy']:.1f}%" for p in s["eps_curve"]))
    for c in checks:
        lines.append(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- report / leaderboard


def cmd_report(args: argparse.Namespace) -> int:
    from robustlab.report.html import write_report
    from robustlab.eval.store import ResultsStore

    _require_db(args.db)
    with ResultsStore(args.db) as store:
        run_id = store.resolve_run(args.run)
        out = Path(args.out) if args.out else Path(f"report-{run_id}")
        paths = write_report(store, run_id, out)
    for p in paths.values():
        print(p)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from robustlab.report.leaderboard import format_leaderboard, leaderboard, write_leaderboard_html
    from robustlab.eval.store import ResultsStore

    _require_db(args.db)
    with ResultsStore(args.db) as store:
        groups = leaderboard(store)
    print(format_leaderboard(groups))
    path = write_leaderboard_html(groups, Path(args.out))
    _say(f"written {path}")
    return 0


def _require_db(db: str) -> None:
    if not Path(db).is_file():
        raise RobustlabError(f"no results store at {db}; run `robustlab eval ... --db {db}` first")


# ---------------------------------------------------------------------- perturb


def cmd_perturb(args: argparse.Namespace) -> int:
    from robustlab.attacks import build_attacks
    from robustlab.attacks.ssp import perturb_folder
    from robustlab.models import load_model
    from robustlab.threat import ThreatModel

    attacks = build_attacks([args.attack], ThreatModel(args.norm, args.eps))
    if len(attacks) != 1:
        raise RobustlabError("perturb takes one attack, not a suite")
    device = _device(args.device)
    model = load_model(args.model, device=device).model
    result = perturb_folder(attacks[0], model, args.images, args.out, image_size=args.image_size,
                            batch_size=args.batch_size, seed=args.seed)
    _say(f"{len(result.files)} images written to {args.out}; the model's prediction changed on "
         f"{100 * result.change_rate:.1f}% of them")
    return 0


# ---------------------------------------------------------------------- zoo


def cmd_zoo(args: argparse.Namespace) -> int:
    from robustlab.models.checkpoint import read_card
    from robustlab.models.zoo import add_to_zoo, list_zoo, zoo_card, zoo_root

    if args.zoo_command == "list":
        entries = list_zoo(args.zoo)
        if not entries:
            print(f"the zoo at {zoo_root(args.zoo)} is empty; add a checkpoint with `robustlab zoo add`")
            return 0
        print(f"{'name':<28} {'architecture':<18} {'dataset':<22} {'clean':>8}  robust accuracy  sha256")
        for name, card in entries:
            robust = ", ".join(f"{k}: {100 * v:.2f}%" for k, v in (card.robust_accuracy or {}).items()) or "—"
            clean = f"{100 * card.clean_accuracy:.2f}%" if card.clean_accuracy is not None else "—"
            print(f"{name:<28} {card.architecture:<18} {card.dataset[:22]:<22} {clean:>8}  {robust}  {card.sha256[:12]}")
        return 0
    if args.zoo_command == "show":
        print(json.dumps(zoo_card(args.name, args.zoo).to_dict(), indent=2))
        return 0
    robust, clean = None, None
    if args.run:
        from robustlab.eval.store import ResultsStore

        _require_db(args.db)
        with ResultsStore(args.db) as store:
            run = store.get_run(args.run)
        if run["status"] != "complete":
            raise RobustlabError(f"run {run['run_id']} is not complete; finish it with --resume first")
        attacks = "+".join(a["name"] for a in run["attacks"])
        # The run's clean accuracy is on its n examples: it goes with the robust number, and becomes
        # the card's clean accuracy only if the card has none (the trainer measures it on the whole
        # test split).
        robust = {f"{run['norm']}:{run['eps']:g} {attacks} (n={run['n']}, clean {100 * run['clean_accuracy']:.2f}%, "
                  f"run {run['run_id']})": run["robust_accuracy"]}
        clean = run["clean_accuracy"] if read_card(args.checkpoint).clean_accuracy is None else None
    path = add_to_zoo(args.checkpoint, args.name, args.zoo, robust, clean, overwrite=args.overwrite)
    print(path)
    return 0


# ---------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from robustlab.demo import run_demo

    paths = run_demo(Path(args.out), device=_device(args.device))
    print(f"results store: {paths['db']}")
    print(f"report:        {paths['report']}")
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustlab", description="Measure and improve adversarial robustness.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (standard or adversarial recipes) and save a checkpoint with its card")
    t.add_argument("--model", required=True, help="architecture name (see robustlab.models.list_models)")
    t.add_argument("--data", required=True, help="data set name, e.g. digits, mnist, cifar10")
    t.add_argument("--data-root", help="folder with the data set files (default: $ROBUSTLAB_DATA or ./data)")
    t.add_argument("--n", "--num-examples", dest="n", type=int,
                   help="train on the first N training images (under torchrun write --num-examples)")
    t.add_argument("--recipe", default="standard", metavar="NAME[:key=value,...]",
                   help="training objective: standard, pgd-at, trades, mart, fgsm-at, fast-at, n-fgsm, alp, clp, vat, "
                        "gradient-reg, distillation (teacher=PATH), curriculum-at, dual-bn (clean and adversarial "
                        "BatchNorm), rst (teacher=PATH), uat (with --unlabeled), mma (max-margin) and dynamic-at (FOSC-stopped "
                        "PGD); e.g. trades:beta=6,steps=10 "
                        "(default standard)")
    t.add_argument("--norm", default="linf", help="threat model norm: linf, l2 or l1 (default linf)")
    t.add_argument("--eps", type=_argument_type(_number),
                   help="threat model radius in [0, 1] pixel units (fractions like 8/255 work); needed by adversarial "
                        "recipes, and turns on robust validation")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "multistep", "cyclic"])
    t.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (epochs)")
    t.add_argument("--milestones", type=_argument_type(_floats), default=[0.5, 0.75],
                   help="multistep: fractions of the run where the rate is multiplied by --gamma (default 0.5,0.75)")
    t.add_argument("--gamma", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, help="clip the gradient's global L2 norm to this value")
    t.add_argument("--ema", type=float, nargs="?", const=0.999, metavar="DECAY",
                   help="keep an exponential moving average of the weights (default decay 0.999), saved beside "
                        "--out as *_ema.safetensors")
    t.add_argument("--val-n", type=int,
                   help="hold out N training images for validation each epoch (clean and PGD accuracy; best epoch "
                        "restored); default: 10%% up to 256 when --eps is given, else 0")
    t.add_argument("--val-steps", type=int, default=10, help="PGD steps of the validation attack")
    t.add_argument("--patience", type=int, default=0, help="stop after N epochs without a better validation score")
    t.add_argument("--no-restore-best", action="store_true", help="keep the last epoch's weights, not the best")
    t.add_argument("--co-detection", default="auto", choices=["auto", "on", "off"],
                   help="stop on catastrophic overfitting (auto: for single-step recipes)")
    t.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU (fast with AMX or AVX512-BF16)")
    t.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", required=True, help="checkpoint path (.safetensors; the card goes beside it as .json)")
    t.add_argument("--checkpoint-dir", help="where the training state is saved after every epoch (default: OUT "
                                            "without suffix + .train)")
    t.add_argument("--resume", action="store_true", help="continue a killed run from its saved training state")
    t.add_argument("--unlabeled", metavar="SPEC",
                   help="extra unlabeled images for rst/uat: a data set NAME[:SPLIT] (labels ignored; default split "
                        "train; read from --data-root) or a folder of images")
    t.add_argument("--unlabeled-fraction", type=_argument_type(_number), metavar="F",
                   help="share of each batch drawn from --unlabeled, in (0, 1) (default 0.5)")
    t.add_argument("--bn", choices=["clean", "adv"],
                   help="dual-bn recipe: the BatchNorm branch used for validation and at test time, recorded in the "
                        "card (default clean)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate clean and robust accuracy under an attack ensemble")
    e.add_argument("--model", required=True, help="registry name, checkpoint path, or file.py:function / module:function")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--data-root")
    e.add_argument("--n", "--num-examples", dest="n", type=int,
                   help="evaluate the first N examples of the split, in order (under torchrun, whose own "
                   "parser takes --n for its --nnodes, write --num-examples)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--norm", required=True, help="linf, l2 or l1")
    e.add_argument("--eps", required=True, type=_argument_type(_number), help="radius in [0, 1] pixel units (fractions like 8/255 work)")
    e.add_argument("--eps-grid", type=_argument_type(_floats), help="comma-separated epsilons for the robustness curve")
    e.add_argument("--steps-grid", type=_argument_type(_steps_grid), default=None,
                   help="strengths (iterations, or queries for black-box attacks) for the attack-strength curve "
                   "of the first attack that has one (auto, none, or 1,5,10)")
    e.add_argument("--attack", action="append", metavar="NAME[:key=value,...]",
                   help="attack to run (repeat for an ensemble, run in order), a suite (standard, rand), or an "
                   "ensemble file (.txt: one spec per line, .json: a list); default pgd")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--db", default=DEFAULT_DB, help=f"results store (SQLite), default {DEFAULT_DB}")
    e.add_argument("--resume", action="store_true", help="continue an unfinished run with the same configuration")
    e.add_argument("--no-sanity", action="store_true", help="skip the gradient-masking sanity checks")
    e.add_argument("--bn", choices=["clean", "adv"],
                   help="for a model with dual batch norm: evaluate this branch (default: the card's test_branch)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="write an HTML report (plus JSON and CSV) for a run")
    r.add_argument("run", help="run id, unique prefix, or 'latest'")
    r.add_argument("--db", default=DEFAULT_DB)
    r.add_argument("--out", help="output folder (default report-RUN)")
    r.set_defaults(func=cmd_report)

    lb = sub.add_parser("leaderboard", help="rank all runs in the store per (data set, threat model)")
    lb.add_argument("--db", default=DEFAULT_DB)
    lb.add_argument("--out", default="leaderboard.html", help="HTML output path")
    lb.set_defaults(func=cmd_leaderboard)

    pt = sub.add_parser("perturb", help="perturb every image of a folder (no labels needed), e.g. with the "
                        "label-free ssp attack, and write the results as PNG")
    pt.add_argument("--model", required=True, help="the model whose predictions are attacked")
    pt.add_argument("--attack", default="ssp", metavar="NAME[:key=value,...]",
                    help="default ssp (feature-space, label-free); any untargeted attack works")
    pt.add_argument("--norm", required=True)
    pt.add_argument("--eps", required=True, type=_argument_type(_number))
    pt.add_argument("--images", required=True, help="folder of images (sub-folders included)")
    pt.add_argument("--out", required=True, help="output folder (same relative names, .png)")
    pt.add_argument("--image-size", type=int, help="resize every image to this square size first")
    pt.add_argument("--batch-size", type=int, default=64)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="auto")
    pt.set_defaults(func=cmd_perturb)

    z = sub.add_parser("zoo", help="the local model zoo: list, show, add (models load as --model zoo:NAME)")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zl = zsub.add_parser("list", help="list the zoo's models with their measured accuracies")
    zs = zsub.add_parser("show", help="print a model's card")
    zs.add_argument("name")
    za = zsub.add_parser("add", help="add a checkpoint (verified by hash) under a name")
    za.add_argument("checkpoint", help="X.safetensors with its card X.json beside it")
    za.add_argument("--name", required=True)
    za.add_argument("--run", help="record the accuracies of this complete run (id, prefix or 'latest')")
    za.add_argument("--db", default=DEFAULT_DB, help="results store holding --run")
    za.add_argument("--overwrite", action="store_true",
                    help="replace the entry NAME; with the same weights, the accuracies its card records are kept")
    for zp in (zl, zs, za):
        zp.add_argument("--zoo", help="zoo folder (default $ROBUSTLAB_ZOO or ~/.robustlab/zoo)")
    z.set_defaults(func=cmd_zoo)

    d = sub.add_parser("demo", help="train a small model on the embedded digits and evaluate it end to end")
    d.add_argument("--out", default="robustlab-demo", help="output folder")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RobustlabError as exc:
        _say(f"robustlab: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("robustlab: interrupted; finished batches are saved, continue with --resume")
        return 130
    except Exception as exc:  # an unexpected failure: short message unless debugging
        if os.environ.get("ROBUSTLAB_DEBUG"):
            raise
        _say(f"robustlab: internal error: {type(exc).__name__}: {exc} (set ROBUSTLAB_DEBUG=1 for the traceback)")
        return 1
