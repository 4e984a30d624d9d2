"""``robustlab purify``: purify a folder of images with a trained purifier (NRP), and ``robustlab
purify train``: train one without labels (SSP perturbations against a feature network)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from robustlab.cli.common import _argument_type, _device, _number, _say
from robustlab.errors import RobustlabError


def cmd_purify(args: argparse.Namespace) -> int:
    from robustlab.defenses.nrp import purify_folder
    from robustlab.models.purifier import load_purifier

    if not args.images or not args.out or not args.purifier:
        raise RobustlabError("purify needs --images DIR, --out DIR and --purifier FILE "
                             "(or `robustlab purify train ...` to train a purifier)")
    purifier, card = load_purifier(args.purifier, device=_device(args.device))
    files = purify_folder(purifier, args.images, args.out, size=args.size, batch_size=args.batch_size)
    _say(f"{len(files)} purified images written to {args.out} (purifier {args.purifier}, "
         f"{card.arch_kwargs.get('architecture')}, trained on {card.dataset or 'unknown data'})")
    return 0


def _feature_network(spec: str, channels: int, image_size: tuple[int, int], seed: int, device):
    """The feature network: a registry architecture name gives a randomly initialised one (seeded)
    for images of ``channels`` channels; anything else is a model spec (checkpoint, zoo:NAME, ...)."""
    import torch

    from robustlab.models import MODELS, create_model, load_model

    if spec in MODELS:
        torch.manual_seed(seed)
        kwargs = {"input_size": tuple(image_size)} if "input_size" in _arguments(MODELS.get(spec)) else {}
        net = create_model(spec, num_classes=10, in_channels=channels, **kwargs)
        return net.to(device).eval(), f"{spec} (random initialisation, seed {seed})"
    return load_model(spec, device=device).model.eval(), spec


def _arguments(factory) -> set[str]:
    import inspect

    return set(inspect.signature(factory).parameters)


def _load_images(args: argparse.Namespace):
    """The training images: a data set (its ``--split``) or a folder of images in any layout (no labels)."""
    import torch

    from robustlab.data import ImageDataset, load_dataset
    from robustlab.data.image_folder import load_unlabeled_images, parse_folder_spec

    folder = Path(args.data).expanduser()
    if parse_folder_spec(args.data) is not None or folder.is_dir():
        try:
            x = load_unlabeled_images(folder, image_size=args.size)
        except RobustlabError as exc:
            if "size" in str(exc) and args.size is None:
                raise RobustlabError(f"{exc}; give --size to resize them all") from None
            raise
        data = ImageDataset(folder.name or str(folder), "train", x, torch.zeros(len(x), dtype=torch.long), ["image"])
    else:
        data = load_dataset(args.data, args.split, root=args.data_root, image_size=args.size)
    if args.n is not None:
        if args.n < 1:
            raise RobustlabError(f"--n must be >= 1, got {args.n}")
        data = data.subset(min(args.n, len(data)))
    return data


def cmd_train(args: argparse.Namespace) -> int:
    from robustlab.models.purifier import PURIFIERS, save_purifier
    from robustlab.training.loop import TrainConfig
    from robustlab.training.purifier import PurifierConfig, train_purifier

    PURIFIERS.get(args.arch)  # an unknown architecture is said before any data is loaded
    if args.save_every_minutes < 0:
        raise RobustlabError(f"--save-every-minutes must be >= 0, got {args.save_every_minutes:g}")
    device = _device(args.device)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    state_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.stem + ".train")
    data = _load_images(args)
    channels, height, width = data.image_shape
    network, desc = _feature_network(args.feature_model, channels, (height, width), args.seed, device)
    options = {k: v for k, v in (("width", args.width), ("blocks", args.blocks)) if v is not None}
    config = PurifierConfig(
        architecture=args.arch, options=options, norm=args.norm, eps=args.eps, steps=args.steps, layer=args.layer or "",
        feature_weight=args.feature_weight, pixel_weight=args.pixel_weight, adv_weight=args.adv_weight,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adam",
                          weight_decay=0.0, schedule="cosine", seed=args.seed))
    _say(f"{'resuming' if args.resume else 'training'} a {args.arch} purifier on {data.name} ({len(data)} images, "
         f"{channels}x{height}x{width}) against {desc} for {args.epochs} epoch(s) on {device}; state in {state_dir}")
    t0 = time.perf_counter()

    def report(record: dict) -> None:
        _say(f"epoch {record['epoch']}/{args.epochs}: feature loss {record['train_feature_loss']:.4f} (unpurified "
             f"{record['train_feature_loss_unpurified']:.4f}), pixel loss {record['train_pixel_loss']:.5f}, "
             f"{record['seconds']:.0f}s")

    try:
        run = train_purifier(data, network, desc, config, device=device, on_epoch=report, checkpoint_dir=state_dir,
                             resume=args.resume, save_every=60 * args.save_every_minutes)
    except KeyboardInterrupt:
        from robustlab.cli.train import _what_was_saved

        raise KeyboardInterrupt(_what_was_saved(state_dir, args.save_every_minutes)) from None
    record = {**run.record, "seconds": round(time.perf_counter() - t0, 1), "resumed": bool(args.resume),
              "history": list(run.history)}
    path = save_purifier(run.purifier.cpu(), out, args.arch, options, (height, width), record,
                         dataset=f"{data.name}:{data.split}[{len(data)}]")
    _say(f"layer {run.record['layer']}: feature loss {run.record['final'].get('train_feature_loss', float('nan')):.4f} "
         f"after training (unpurified {run.record['final'].get('train_feature_loss_unpurified', float('nan')):.4f})")
    print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("purify", help="purify a folder of images with a trained purifier (NRP); "
                       "`purify train` trains one without labels")
    p.add_argument("--images", help="folder of images to purify (sub-folders included)")
    p.add_argument("--out", help="output folder: the purified images, same relative paths and file names")
    p.add_argument("--purifier", help="purifier file (X.safetensors with its card X.json) from `robustlab purify train`")
    p.add_argument("--size", type=int, help="resize every image to this square size first (needed when sizes differ)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_purify)
    inner = p.add_subparsers(dest="purify_command", metavar="train", required=False)
    t = inner.add_parser("train", help="train a purifier without labels: SSP perturbations against a feature "
                         "network, purified features matched to the clean ones")
    t.add_argument("--data", required=True, help="training images: a data set name (its --split) or a folder of "
                   "images in any layout (labels are never used)")
    t.add_argument("--split", default="train", help="split of a named data set (default train)")
    t.add_argument("--data-root")
    t.add_argument("--n", type=int, help="train on the first N images only")
    t.add_argument("--size", type=int, help="resize every image to this square size first (needed when sizes differ)")
    t.add_argument("--feature-model", required=True,
                   help="the frozen feature network: a checkpoint, zoo:NAME or other model spec (a classifier trained "
                        "on similar images), or a registry architecture name for a randomly initialised one")
    t.add_argument("--layer", help="the feature network's layer (a name from its named_modules; default: the deepest "
                   "layer with a spatial feature map)")
    t.add_argument("--arch", default="residual", help="purifier architecture: residual (small, default) or dense")
    t.add_argument("--width", type=int, help="purifier channels inside (default 32)")
    t.add_argument("--blocks", type=int, help="purifier blocks (default: 4 residual, 2 dense)")
    t.add_argument("--norm", default="linf", help="norm of the SSP perturbations trained on: linf (default) or l2")
    t.add_argument("--eps", type=_argument_type(_number), default=16 / 255,
                   help="SSP budget during training (default 16/255, the paper's; use at least the budget to defend)")
    t.add_argument("--steps", type=int, default=5, help="SSP steps per batch (default %(default)s)")
    t.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature loss (default %(default)s)")
    t.add_argument("--pixel-weight", type=float, default=1.0, help="weight of the pixel loss (default %(default)s; 0: off)")
    t.add_argument("--adv-weight", type=float, default=0.0,
                   help="weight of the adversarial (discriminator) loss (default 0: off; the paper's is 0.005)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the images (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine schedule (default %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", required=True, help="the purifier file to write (X.safetensors; its card X.json beside it)")
    t.add_argument("--checkpoint-dir", help="where the training state goes (default: OUT's name + .train)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in the checkpoint folder")
    t.add_argument("--save-every-minutes", type=float, default=5.0,
                   help="also save the training state inside an epoch this often (default %(default)s; 0: every batch)")
    t.set_defaults(func=cmd_train)
