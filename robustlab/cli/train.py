"""``robustlab train``: train a model with a recipe and save a checkpoint with its card."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from robustlab.cli.common import _argument_type, _device, _floats, _number, _say, _threat
from robustlab.errors import RobustlabError


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from robustlab import distributed
    from robustlab.params import parse_spec
    from robustlab.data import load_dataset
    from robustlab.models import ModelCard, convert_to_dual_bn, create_model, save_checkpoint, set_bn_branch
    from robustlab.training import (
        OBJECTIVES,
        TrainConfig,
        accuracy,
        cpu_has_bf16,
        create_objective,
        load_unlabeled,
        split_holdout,
        train,
    )

    # Under torchrun: data-parallel training, every rank holds the same weights; rank 0 writes and prints.
    distributed.init_from_env()
    say = _say if distributed.is_main() else (lambda msg: None)
    from robustlab.models import MODELS

    MODELS.get(args.model)  # an unknown architecture is said before any data is loaded
    from robustlab.models.kwta import parse_activation

    parse_activation(args.activation or "relu")  # a bad activation is said before any data is loaded
    import robustlab.vlm  # noqa: F401  (registers the vision-language recipes, to name them in errors)

    name, params = parse_spec(args.recipe, "recipe")
    recipe = OBJECTIVES.get(name)
    if recipe.model_kind != "classifier":
        raise RobustlabError(f"recipe {name!r} adapts a vision-language model: run it with `robustlab adapt --recipe "
                             f"{name}` (robustlab train trains classifiers)")
    threat = _threat(args.norm, args.eps) if args.eps is not None else None
    if recipe.adversarial and threat is None:
        raise RobustlabError(f"recipe {name!r} trains against a threat model: give --eps (and --norm, default linf)")
    _check_train_flags(args, name, recipe)
    objective = create_objective(name, threat, **params)
    from robustlab.defenses import DefendedModel, build_defenses

    defenses = build_defenses(args.defense or [])  # bad names or parameters fail before any data is loaded
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    device = _device(args.device)
    if args.amp and device.type == "cpu" and cpu_has_bf16() is False:
        say("robustlab: warning: --amp on this CPU means bfloat16 without hardware support (no AVX512-BF16 "
            "or AMX): usually slower than float32; leave --amp out")
    data = load_dataset(args.data, "train", root=args.data_root)
    test = load_dataset(args.data, "test", root=args.data_root)
    if args.n:
        if args.n > len(data):
            _say(f"robustlab: note: --n {args.n} is more than the {len(data)} images of {data.name}:{data.split}; "
                 f"using all {len(data)}")
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
    channels = data.image_shape[0]
    for d in defenses:  # an encoding in front (thermometer) changes what the architecture takes
        channels = d.output_channels(channels)
    arch_kwargs = {"activation": args.activation} if args.activation else {}
    # k-WTA masks gradients: its card declares the attack that estimates them by sampling, so the
    # evaluation of the checkpoint is adaptive (the plain attacks run beside it as the non-adaptive ones)
    declared = ([d.config() for d in build_defenses(["sampled-gradients"])]
                if parse_activation(args.activation or "relu") else [])
    arch_kwargs.update(getattr(objective, "model_options", dict)())  # e.g. mmc: the MMC head
    # a recipe may declare what its models' attackers need (mmc: a margin loss, cross-entropy saturates)
    declared += [d.config() for d in build_defenses(getattr(objective, "declared_defenses", list)())]
    base = create_model(args.model, num_classes=data.num_classes, in_channels=channels, **arch_kwargs)
    # With --defense the model trains behind the defenses (attacks in adversarial recipes go through
    # them adaptively: BPDA where declared); the checkpoint holds the model, its card the defenses.
    model = DefendedModel(base, defenses) if defenses else base
    _probe(model, data, args.model)
    dual_bn = None
    if recipe.needs_dual_bn:  # clean and adversarial BatchNorm branches; validation and test use --bn's
        dual_bn = {"test_branch": args.bn or "clean"}
        set_bn_branch(convert_to_dual_bn(model), dual_bn["test_branch"])
    if args.save_every_minutes < 0:
        raise RobustlabError(f"--save-every-minutes must be >= 0, got {args.save_every_minutes:g}")
    t0 = time.perf_counter()
    try:
        history = train(model, data, config, objective, device=device, on_epoch=report, val_data=val_data,
                        threat=threat, checkpoint_dir=state_dir, resume=args.resume, unlabeled=unlabeled,
                        save_every=60 * args.save_every_minutes)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_what_was_saved(state_dir, args.save_every_minutes)) from None
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
            in_channels=channels,
            arch_kwargs=arch_kwargs,
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
        if defenses or declared:
            card = dataclasses.replace(card, source="defended", defense=[d.config() for d in defenses] + declared)
        return card, acc

    def weights(net: torch.nn.Module) -> torch.nn.Module:
        return net.model if isinstance(net, DefendedModel) else net

    card, acc = card_for(model, summary.get("final_val", {}), {})
    path = save_checkpoint(weights(model).cpu(), out, card)
    what = "pixel accuracy" if data.dense else "accuracy"  # per-pixel labels: a segmentation model
    _say(f"clean test {what} {100 * acc:.2f}% after {seconds:.1f}s")
    print(path)
    if history.ema is not None:
        ema_card, ema_acc = card_for(history.ema, summary.get("ema_val", {}), {"weights": "ema"})
        ema_path = save_checkpoint(weights(history.ema).cpu(), out.with_name(out.stem + "_ema.safetensors"), ema_card)
        _say(f"weight average (EMA): clean test accuracy {100 * ema_acc:.2f}%")
        print(ema_path)
    return 0


def _probe(model, data, name: str) -> None:
    """One forward pass on two training images before anything is trained or written: an architecture
    built for another image size fails here with the size it expects."""
    from robustlab.data import is_dense
    from robustlab.models import model_config
    from robustlab.models.probe import probe_model

    x, _ = data.batch(range(min(2, len(data))))
    try:  # per-pixel labels need a segmentation architecture, and image labels a classifier
        probe_model(model, x, model_desc=f"--model {name}", data_desc=data.name,
                    input_size=model_config(name).get("input_size"), advice="; choose an architecture for this data",
                    dense=is_dense(data))
    finally:
        model.train()


def _what_was_saved(state_dir: Path, minutes: float) -> str:
    """What a Ctrl-C leaves behind: the last saved training state, or that there is none yet."""
    import json

    from robustlab.training.state import STATE_FILE

    try:
        meta = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (f"nothing was saved yet (the training state goes to {state_dir} every {minutes:g} minutes and at the "
                "end of epoch 1)")
    within = meta.get("within")
    where = f"epoch {meta['epoch']}"
    if within:
        where = f"epoch {meta['epoch'] + 1}, batch {within['batch']} of {meta.get('steps_per_epoch', '?')}"
        return (f"the training state at {where} (saved {meta.get('saved', '')}) is in {state_dir}; "
                "continue from there with --resume")
    return f"the training state after {where} (saved {meta.get('saved', '')}) is in {state_dir}; continue with --resume"


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model (standard or adversarial recipes) and save a checkpoint with its card")
    t.add_argument("--model", required=True, help="architecture to train, by name (`robustlab list models`)")
    t.add_argument("--data", required=True)
    t.add_argument("--activation", metavar="relu|kwta:RATIO",
                   help="kwta:RATIO puts k-winners-take-all (keep the top RATIO of each layer's activations per "
                        "image, e.g. kwta:0.1) in place of every ReLU; the card records it (default relu)")
    t.add_argument("--data-root")
    t.add_argument("--n", "--num-examples", dest="n", type=int,
                   help="train on the first N training images (under torchrun write --num-examples)")
    t.add_argument("--recipe", default="standard", metavar="NAME[:key=value,...]",
                   help="training objective: standard, pgd-at, trades, mart, fgsm-at, fast-at, n-fgsm, alp, clp, vat, "
                        "gradient-reg, distillation (temperature=T: the first network; with teacher=PATH: the "
                        "distilled one), curriculum-at, dual-bn (clean and adversarial "
                        "BatchNorm), mmc (Max-Mahalanobis centers, radius=C), rst (teacher=PATH), uat (with --unlabeled), mma (max-margin) and dynamic-at (FOSC-stopped "
                        "PGD); e.g. trades:beta=6,steps=10 "
                        "(default standard)")
    t.add_argument("--defense", action="append", metavar="NAME[:key=value,...]",
                   help="train the model behind this defense (repeat: applied in order); the card records it, so "
                        "evaluation applies it; an encoding (thermometer) builds the architecture for its channels")
    t.add_argument("--norm", default="linf", help="threat model norm: linf, l2 or l1 (default linf)")
    t.add_argument("--eps", type=_argument_type(_number),
                   help="threat model radius in [0, 1] pixel units (fractions like 8/255 work); needed by adversarial "
                        "recipes, and turns on robust validation")
    t.add_argument("--epochs", type=int, default=10, help="passes over the training data (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="sgd (Nesterov momentum 0.9) or adam (default %(default)s)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default %(default)s)")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "multistep", "cyclic"],
                   help="learning-rate schedule: cosine, constant, multistep (see --milestones) or cyclic "
                        "(one-cycle) (default %(default)s)")
    t.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (epochs)")
    t.add_argument("--milestones", type=_argument_type(_floats), default=[0.5, 0.75],
                   help="multistep: fractions of the run where the rate is multiplied by --gamma (default 0.5,0.75)")
    t.add_argument("--gamma", type=float, default=0.1, help="multistep: the factor at each milestone (default %(default)s)")
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
    t.add_argument("--checkpoint-dir", help="where the training state is saved after every epoch and every "
                                            "--save-every-minutes (default: OUT without suffix + .train)")
    t.add_argument("--resume", action="store_true", help="continue a killed run from its saved training state")
    t.add_argument("--save-every-minutes", type=float, default=5.0, metavar="M",
                   help="also save the training state inside an epoch every M minutes, so a run killed in a long "
                        "epoch resumes from there (to the same weights); 0: after every batch (default 5)")
    t.add_argument("--unlabeled", metavar="SPEC",
                   help="extra unlabeled images for rst/uat: a data set NAME[:SPLIT] (labels ignored; default split "
                        "train; read from --data-root) or a folder of images")
    t.add_argument("--unlabeled-fraction", type=_argument_type(_number), metavar="F",
                   help="share of each batch drawn from --unlabeled, in (0, 1) (default 0.5)")
    t.add_argument("--bn", choices=["clean", "adv"],
                   help="dual-bn recipe: the BatchNorm branch used for validation and at test time, recorded in the "
                        "card (default clean)")
    t.set_defaults(func=cmd_train)
