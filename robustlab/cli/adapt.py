"""``robustlab adapt``: adapt a vision-language model's image tower for zero-shot robustness (TeCoA by
fine-tuning, last blocks or visual prompt tuning; FARE), in robustlab's one training loop, and save
the adaptation (evaluate it with ``robustlab zeroshot --vlm adapted:OUT``). With ``--recipe
clip-contrastive`` it pretrains robustlab's tiny CLIP from scratch on class-name captions of one or
more data sets instead (evaluate or adapt it as ``tiny:OUT``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from robustlab.cli.common import _argument_type, _device, _number, _say, _threat
from robustlab.errors import RobustlabError

RECIPES = ("tecoa", "fare", "clip-contrastive")
PRETRAIN = "clip-contrastive"
DEFAULT_LR = {"tecoa": 1e-5, "fare": 1e-5, PRETRAIN: 2e-3}


def _train_config(args: argparse.Namespace, lr: float):
    from robustlab.training import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                       warmup_epochs=args.warmup_epochs, grad_clip=args.grad_clip, val_n=args.val_n or 0,
                       val_steps=args.val_steps, amp=args.amp)


def _epoch_line(r: dict) -> None:
    val = f", val clean {100 * r['val_clean_acc']:.1f}% pgd {100 * r['val_robust_acc']:.1f}%" if "val_robust_acc" in r else ""
    acc = f", batch caption accuracy {100 * r['clean_acc']:.1f}%" if "clean_acc" in r and not val else ""
    _say(f"  epoch {r['epoch']}: loss {r['loss']:.4f}{acc}{val} ({r['seconds']:.1f}s)")


def cmd_pretrain(args: argparse.Namespace, params: dict) -> int:
    """``--recipe clip-contrastive``: a new tiny CLIP pretrained on captions of ``--data`` (a list)."""
    from robustlab.params import parse_spec
    from robustlab.vlm.pretrain import caption_sources, pretrain_tiny_clip
    from robustlab.vlm.suite import parse_data_list
    from robustlab.vlm.tiny_clip import TinyCLIPConfig, save_tiny_clip

    if params:
        raise RobustlabError(f"recipe {PRETRAIN!r} takes no parameters (its captions come from --data's class names "
                             f"and templates), got {', '.join(sorted(params))}")
    for flag, given in (("--vlm", args.vlm), ("--weights", args.weights), ("--eps", args.eps),
                        ("--mode", args.mode != "full"), ("--val-n", args.val_n)):
        if given:
            raise RobustlabError(f"recipe {PRETRAIN!r} pretrains a new tiny CLIP from scratch; leave out {flag}")
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    _, sizes = parse_spec(f"tiny:{args.tiny_config or ''}", "tiny-clip config")
    config = TinyCLIPConfig.from_dict(sizes)
    device = _device(args.device)
    specs = parse_data_list(args.data)
    if args.prompts and len(specs) > 1:
        raise RobustlabError("--prompts FILE gives the class names of one data set; pretrain on several with "
                             "robustlab's names (leave out --prompts)")
    prompts = {specs[0]: args.prompts} if args.prompts else None
    sources = caption_sources(specs, args.split, args.data_root, prompts, args.templates, config.image_size)
    train_config = _train_config(args, args.lr if args.lr is not None else DEFAULT_LR[PRETRAIN])
    out = Path(args.out)
    state_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + ".train")
    what = ", ".join(f"{s.name} ({min(len(s.data), args.n or len(s.data))} images, {len(s.classnames)} classes x "
                     f"{len(s.templates)} templates)" for s in sources)
    _say(f"{'resuming' if args.resume else 'pretraining'} a tiny CLIP on {what} for {args.epochs} epochs on {device}; "
         f"state in {state_dir}")
    t0 = time.perf_counter()
    try:
        model, _history, described = pretrain_tiny_clip(sources, config, train_config, per_source=args.n, device=device,
                                                        checkpoint_dir=state_dir, resume=args.resume,
                                                        on_epoch=_epoch_line)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the training state after the last finished epoch is in {state_dir}; continue with "
                                "--resume") from None
    seconds = time.perf_counter() - t0
    described["seconds"] = round(seconds, 1)
    path = save_tiny_clip(model.cpu(), out, described, notes="pretrained by robustlab adapt --recipe clip-contrastive")
    _say(f"pretrained in {seconds:.1f}s, logit scale {model.logit_scale:.1f}; evaluate with: robustlab zeroshot "
         f"--vlm tiny:{path} --data ...; adapt with robustlab adapt --vlm tiny:{path} ...")
    print(path)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from robustlab.params import parse_spec
    from robustlab.training import create_objective, split_holdout
    from robustlab.vlm.adapt import adapt, parse_mode, save_adapted, trainable_names
    from robustlab.vlm.loading import load_vlm
    from robustlab.vlm.prompts import prompts_for
    from robustlab.vlm.suite import load_set_data

    name, params = parse_spec(args.recipe, "recipe")
    if name not in RECIPES:
        raise RobustlabError(f"robustlab adapt trains with {', '.join(RECIPES[:-1])} or {RECIPES[-1]}, got recipe {name!r}")
    if name == PRETRAIN:
        return cmd_pretrain(args, params)
    for flag, given in (("--vlm", args.vlm), ("--eps", args.eps is not None)):
        if not given:
            raise RobustlabError(f"recipe {name!r} needs {flag}")
    if args.tiny_config:
        raise RobustlabError(f"--tiny-config sets the sizes of a new tiny CLIP (recipe {PRETRAIN}); recipe {name!r} "
                             "adapts the model of --vlm")
    threat = _threat(args.norm, args.eps)
    objective = create_objective(name, threat, **params)  # bad parameters fail before anything is loaded
    mode = parse_mode(args.mode)
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    device = _device(args.device)
    vlm, info = load_vlm(args.vlm, args.weights, device)
    key, data, folder = load_set_data(args.data, args.split, args.data_root, vlm.image_size)
    prompts = prompts_for(key, list(data.classes), args.prompts, args.templates, folder)
    if args.n:
        data = data.subset(min(args.n, len(data)))
    val_data = None
    if args.val_n:
        data, val_data = split_holdout(data, args.val_n, args.seed)
    config = _train_config(args, args.lr if args.lr is not None else DEFAULT_LR[name])
    out = Path(args.out)
    state_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + ".train")
    _say(f"{'resuming' if args.resume else 'adapting'} {args.vlm} on {key} ({len(data)} images, "
         f"{len(prompts.classnames)} classes x {len(prompts.templates)} templates) with {name} at {threat}, mode "
         f"{mode.describe()}, for {args.epochs} epochs on {device}; state in {state_dir}")

    t0 = time.perf_counter()
    try:
        adapted, history = adapt(vlm, data, prompts.classnames, prompts.templates, objective, mode, config, device,
                                 val_data=val_data, checkpoint_dir=state_dir, resume=args.resume, on_epoch=_epoch_line)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the training state after the last finished epoch is in {state_dir}; continue with "
                                "--resume") from None
    seconds = time.perf_counter() - t0
    trained = sum(dict(adapted.named_parameters())[n].numel() for n in trainable_names(adapted))
    weights = None if args.weights is None else str(Path(args.weights).expanduser().resolve())
    path = save_adapted(adapted.cpu(), out, base=args.vlm, base_weights=weights, training={
        "recipe": name, "recipe_params": objective.config()["params"], "threat": threat.to_dict(),
        "mode": mode.describe(), "data": f"{key}:{args.split}[{len(data)}]", "prompts": prompts.config(),
        "trainable_parameters": trained, **config.to_dict(), "seconds": round(seconds, 1),
        "history": list(history), "summary": history.summary, "base": info})
    _say(f"adapted {trained:,} parameters in {seconds:.1f}s; evaluate with: robustlab zeroshot --vlm adapted:{path} "
         "--data ...")
    print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("adapt", help="adapt a CLIP-like model's image tower for zero-shot robustness (TeCoA, FARE), "
                       "or pretrain robustlab's tiny CLIP (clip-contrastive)")
    a.add_argument("--vlm", help="the vision-language model to adapt: open_clip:NAME with --weights "
                   "FILE, hf:FOLDER, tiny:PATH (robustlab's small CLIP), as for robustlab zeroshot (required by tecoa "
                   "and fare; clip-contrastive builds a new tiny CLIP instead)")
    a.add_argument("--weights", metavar="FILE", help="open_clip checkpoint on disk (for open_clip:NAME)")
    a.add_argument("--data", required=True,
                   help="the data set to adapt on: a name (cifar10, fashion_mnist, mnist, digits, ...; read from "
                   "--data-root) or an image folder path (e.g. ImageNet's train folder, streamed and resized to the "
                   "model's input size); for clip-contrastive a comma-separated list, e.g. "
                   "mnist,fashion_mnist,cifar10,digits")
    a.add_argument("--split", default="train", help="split of a named data set (default train)")
    a.add_argument("--data-root", help="where named data sets are read from")
    a.add_argument("--n", "--num-examples", dest="n", type=int, help="adapt on the first N images (default: all); "
                   "clip-contrastive: at most N images of each data set, a seeded random subset")
    a.add_argument("--prompts", metavar="FILE", help="class names (and templates) for the data, as for robustlab "
                   "zeroshot --prompts (JSON or text); default: robustlab's names for the data set")
    a.add_argument("--templates", metavar="SET", help="prompt template set: photo, digits, clothing or single "
                   "(default: the data set's own)")
    a.add_argument("--recipe", default="tecoa", metavar="NAME[:key=value,...]",
                   help="tecoa (PGD on the zero-shot logits of the training classes + cross-entropy; steps=2, "
                   "alpha=eps by default, Mao et al.) or fare (unsupervised: embedding of the adversarial image kept "
                   "near the original encoder's embedding of the clean one; steps=10, alpha=2.5*eps/steps) "
                   "(default tecoa), or clip-contrastive (pretrain a new tiny CLIP with the CLIP loss on captions made "
                   "of the data sets' class names x templates; saved as OUT with its card, loaded as tiny:OUT)")
    a.add_argument("--tiny-config", metavar="key=value,...",
                   help="clip-contrastive only: sizes of the new tiny CLIP (fields of robustlab.vlm.tiny_clip."
                   "TinyCLIPConfig: image_size=32, patch_size=4, vision_width=64, vision_layers=4, vision_heads=4, "
                   "text_width=64, text_layers=2, text_heads=4, context_length=16, embed_dim=64, mlp_ratio=2; "
                   "default: those)")
    a.add_argument("--mode", default="full", metavar="full|last:blocks=K|vpt:pad=P,tokens=T,deep=BOOL",
                   help="what trains: the whole image tower (full), its last K transformer blocks and head, or "
                   "visual prompts only (a padding frame of P pixels; T prompt tokens, deep or shallow, where the "
                   "tower takes them) (default full)")
    a.add_argument("--norm", default="linf", help="threat model norm: linf (default), l2 or l1")
    a.add_argument("--eps", type=_argument_type(_number),
                   help="adaptation radius in [0, 1] pixel units, e.g. 1/255 (TeCoA) or 4/255 (FARE^4); required by "
                   "tecoa and fare")
    a.add_argument("--epochs", type=int, default=10, help="passes over the data (default %(default)s)")
    a.add_argument("--batch-size", type=int, default=128, help="images per step (default %(default)s)")
    a.add_argument("--lr", type=float, help="peak learning rate (default 1e-5 for tecoa and fare, 2e-3 for "
                   "clip-contrastive; prompts need far more, e.g. 1e-2 with adam)")
    a.add_argument("--optimizer", default="adam", choices=["sgd", "adam"], help="adam (default) or sgd (Nesterov)")
    a.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (default %(default)s)")
    a.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "multistep", "cyclic"],
                   help="learning-rate schedule (default %(default)s)")
    a.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (epochs)")
    a.add_argument("--grad-clip", type=float, help="clip the gradient's global L2 norm to this value")
    a.add_argument("--val-n", type=int, default=0, help="hold out N training images for zero-shot clean and PGD "
                   "validation each epoch (best epoch restored; default 0: none)")
    a.add_argument("--val-steps", type=int, default=10, help="PGD steps of the validation attack")
    a.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on CPU")
    a.add_argument("--seed", type=int, default=0, help="seed of data order, random starts and prompt init")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    a.add_argument("--out", required=True, help="where the adaptation (or the pretrained tiny CLIP) goes: "
                   "X.safetensors and its card X.json")
    a.add_argument("--checkpoint-dir", help="where the training state is saved after every epoch (default: OUT "
                   "without suffix + .train)")
    a.add_argument("--resume", action="store_true", help="continue a killed run from its saved training state")
    a.set_defaults(func=cmd_adapt)
