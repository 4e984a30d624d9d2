"""Zero-shot adversarial robustness at small scale: TeCoA (fine-tuning, last blocks, visual prompt
tuning) and FARE on robustlab's tiny CLIP, against the original model, beside the published
ImageNet-scale figures.

1. A tiny CLIP is pretrained (CLIP loss, learned temperature) on captions made of class names x
   templates over MNIST, Fashion-MNIST, CIFAR-10 (train subsets of the shared data) and the embedded
   digits; cached in ``benchmarks/.cache/``.
2. Its image tower is adapted on ONE data set (``--adapt-on``, default fashion_mnist, a train subset) by
   TeCoA-finetune (all of the image tower), TeCoA-last (the last 2 of 4 blocks), TeCoA-VPT (padding
   prompt + deep prompt tokens; the model frozen) and FARE (full image tower, no labels).
3. Zero-shot clean and robust accuracy (PGD, Linf 1/255 and 4/255) of every model on the OTHER data
   sets' test images, and their average.
4. The cost of one adaptation epoch against the forward+backward floor of the image encoder (process
   CPU time, measured in this process on the same images and batch size).

Run: ``nice python benchmarks/vlm_tecoa.py`` (about 15 CPU-minutes at the default sizes, pretraining included);
writes ``benchmarks/results/vlm_tecoa.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    CACHE,
    RESULTS,
    environment,
    log,
    set_threads,
    shared_data_dir,
    write_report,
)
from robustlab.attacks import create_attack
from robustlab.data import load_dataset
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective
from robustlab.vlm.adapt import adapt, trainable_names
from robustlab.vlm.pretrain import CaptionSource, pretrain_tiny_clip
from robustlab.vlm.prompts import prompts_for
from robustlab.vlm.tiny_clip import (
    TinyCLIPConfig,
    load_tiny_clip,
    read_tiny_clip_card,
    save_tiny_clip,
)
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier

SETS = ("mnist", "fashion_mnist", "cifar10", "digits")
VARIANT_KEYS = ("original", "tecoa-ft", "tecoa-last", "tecoa-vpt", "fare")
PRETRAIN_VERSION = "tiny-clip-bench/1"

# Published figures, for context (ImageNet-scale; averages over many zero-shot data sets).
PUBLISHED = """\
Published, ImageNet-scale (context only: other models, data sets and attacks):
  Mao et al., ICLR 2023 (TeCoA), CLIP ViT-B/32 adapted on ImageNet at Linf 1/255, zero-shot average over
  16 data sets, PGD-100 at 1/255 (README of github.com/cvlab-columbia/ZSRobust4FoundationModel):
      vanilla CLIP-B/32        clean 64.56   robust  6.57
      TeCoA, fine-tuning       clean 55.97   robust 38.18
      standard AT, fine-tuning clean 18.49   robust 10.62
  Schlarmann et al., ICML 2024 (FARE), CLIP ViT-L/14 adapted 2 epochs on ImageNet, average zero-shot
  accuracy (README of github.com/chs20/RobustVLM; Linf, APGD/AutoAttack-style):
      model        clean   robust 2/255   robust 4/255
      OpenAI CLIP   73.1        0.0            0.0
      TeCoA^2       60.0       43.6           27.0
      FARE^2        67.0       43.1           20.5
      TeCoA^4       54.2       42.3           31.9
      FARE^4        61.1       45.9           32.4
"""


def captions(name: str, data) -> tuple[list[str], list[str]]:
    p = prompts_for(name, list(data.classes))
    return p.classnames, p.templates


def pretrained(args) -> Path:
    """The cached tiny CLIP (pretrained here on first use)."""
    path = CACHE / f"tiny_clip_{args.pretrain_per_source}_{args.pretrain_epochs}.safetensors"
    if path.exists() and read_tiny_clip_card(path).training.get("version") == PRETRAIN_VERSION:
        return path
    root = shared_data_dir()
    sources = []
    for name in SETS:
        data = load_dataset(name, "train", root=None if name == "digits" else root)
        names, templates = captions(name, data)
        sources.append(CaptionSource(name, data, names, templates))
    cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=128, lr=2e-3, optimizer="adam", weight_decay=1e-4,
                      warmup_epochs=0.5, seed=0)
    log(f"pretraining the tiny CLIP: {args.pretrain_per_source} images per set, {args.pretrain_epochs} epochs")
    t0 = time.process_time()
    model, _history, described = pretrain_tiny_clip(sources, TinyCLIPConfig(), cfg, per_source=args.pretrain_per_source,
                                                    progress=True, checkpoint_dir=str(CACHE / "tiny_clip_pretrain.train"),
                                                    resume=(CACHE / "tiny_clip_pretrain.train" / "state.json").exists())
    described["version"] = PRETRAIN_VERSION
    described["cpu_seconds"] = round(time.process_time() - t0, 1)
    save_tiny_clip(model, path, described, notes="pretrained by benchmarks/vlm_tecoa.py")
    return path


def robust_accuracy(clf, x, y, eps_list, steps, seed=0) -> dict[str, float]:
    """Clean accuracy and, per epsilon, the share classified correctly clean and under PGD (CE, one
    random start, ``steps`` steps of 2.5 eps / steps); only clean-correct points are attacked."""
    out = {}
    with eval_mode(clf), torch.no_grad():
        pred = torch.cat([clf(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    ok = pred == y
    out["clean"] = float(ok.float().mean())
    for eps in eps_list:
        attack = create_attack("pgd", ThreatModel("linf", eps), steps=steps)
        idx = ok.nonzero().flatten()
        robust = 0
        for i in range(0, len(idx), 250):
            j = idx[i:i + 250]
            g = torch.Generator().manual_seed(seed + i)
            x_adv = attack.run(clf, x[j], y[j], g).x_adv
            with torch.no_grad(), eval_mode(clf):
                robust += int((clf(x_adv).argmax(1) == y[j]).sum())
        out[f"{eps * 255:g}/255"] = robust / len(x)
    return out


def encoder_floor(vlm, data, batch_size: int) -> float:
    """CPU seconds of one pass of forward + backward (parameter gradients) of the image encoder over
    ``data`` in batches: what any training epoch costs at least."""
    vlm.train()
    t0 = time.process_time()
    for i in range(0, len(data), batch_size):
        x, _ = data.batch(range(i, min(len(data), i + batch_size)))
        vlm.zero_grad(set_to_none=True)
        vlm.encode_image(x).float().pow(2).sum().backward()
    vlm.zero_grad(set_to_none=True)
    vlm.eval()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapt-on", default="fashion_mnist", choices=SETS)
    ap.add_argument("--adapt-n", type=int, default=3000, help="training images for adaptation")
    ap.add_argument("--adapt-epochs", type=int, default=2)
    ap.add_argument("--train-eps", type=float, default=4.0, help="adaptation epsilon in 1/255 units")
    ap.add_argument("--eval-n", type=int, default=200, help="test images per zero-shot data set")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--pretrain-per-source", type=int, default=3000)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="learning rate of fine-tuning (Adam)")
    ap.add_argument("--prompt-lr", type=float, default=1e-2, help="learning rate of prompt tuning (Adam)")
    ap.add_argument("--variants", default=",".join(VARIANT_KEYS), help="which models, comma-separated")
    ap.add_argument("--out", default=str(RESULTS / "vlm_tecoa.txt"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    root = shared_data_dir()
    path = pretrained(args)
    card = read_tiny_clip_card(path)
    log(f"tiny CLIP: {path} (pretraining {card.training.get('cpu_seconds')} CPU s)")

    train_full = load_dataset(args.adapt_on, "train", root=None if args.adapt_on == "digits" else root)
    train_names, train_templates = captions(args.adapt_on, train_full)
    train_data = train_full.subset(min(args.adapt_n, len(train_full)))
    eval_sets = {}
    for name in SETS:
        if name == args.adapt_on:
            continue
        test = load_dataset(name, "test", root=None if name == "digits" else root)
        n = min(args.eval_n, len(test))
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(test), generator=g)[:n].sort().values
        x, y = test.batch(idx)
        eval_sets[name] = (x, y, *captions(name, test))
    # The adaptation set's own test images, zero-shot too (what TeCoA trains for directly).
    own_test = load_dataset(args.adapt_on, "test", root=None if args.adapt_on == "digits" else root)
    idx = torch.randperm(len(own_test), generator=torch.Generator().manual_seed(1))[:min(args.eval_n, len(own_test))]
    own = (*own_test.batch(idx.sort().values), train_names, train_templates)

    eps_train = args.train_eps / 255
    threat = ThreatModel("linf", eps_train)
    cfg = {"epochs": args.adapt_epochs, "batch_size": 128, "optimizer": "adam", "weight_decay": 0.0, "warmup_epochs": 0.0, "seed": 0}
    ft, pt = args.ft_lr, args.prompt_lr
    every = {
        "original": ("original", None),
        "tecoa-ft": ("TeCoA finetune", ("tecoa", {"steps": 2}, "full", ft)),
        "tecoa-last": ("TeCoA last 2 blocks", ("tecoa", {"steps": 2}, "last:blocks=2", ft)),
        "tecoa-vpt": ("TeCoA VPT (pad 2 + 8 deep tokens)", ("tecoa", {"steps": 2}, "vpt:pad=2,tokens=8,deep=true", pt)),
        "fare": ("FARE finetune", ("fare", {"steps": 10}, "full", ft)),
    }
    variants = dict(every[k.strip()] for k in args.variants.split(","))
    eps_eval = [1 / 255, 4 / 255]
    rows, costs, sizes = {}, {}, {}
    for label, spec in variants.items():
        vlm = load_tiny_clip(path)
        if spec is not None:
            recipe, params, mode, lr = spec
            floor = encoder_floor(load_tiny_clip(path), train_data, 128)
            objective = create_objective(recipe, threat, **params)
            t0 = time.process_time()
            vlm, history = adapt(vlm, train_data, train_names, train_templates, objective, mode,
                                 TrainConfig(lr=lr, **cfg), progress=True)
            per_epoch = (time.process_time() - t0) / args.adapt_epochs
            costs[label] = (per_epoch, floor, history[-1]["loss"])
            sizes[label] = sum(dict(vlm.named_parameters())[n].numel() for n in trainable_names(vlm))
            log(f"{label}: {per_epoch:.1f} CPU s/epoch ({per_epoch / floor:.2f}x the floor), last loss {history[-1]['loss']:.4f}")
        results = {}
        for name, (x, y, names, templates) in {**eval_sets, f"{args.adapt_on} (adapted on)": own}.items():
            clf = ZeroShotClassifier(vlm, text_classifier(vlm, names, templates))
            results[name] = robust_accuracy(clf, x, y, eps_eval, args.pgd_steps)
            log(f"  {label} on {name}: {results[name]}")
        rows[label] = results

    vlm = load_tiny_clip(path)
    n_visual = sum(p.numel() for p in vlm.visual.parameters())
    n_text = sum(p.numel() for p in vlm.text.parameters())
    others = list(eval_sets)
    keys = ["clean", *[f"{e * 255:g}/255" for e in eps_eval]]

    lines = [
        "Zero-shot adversarial robustness of a tiny CLIP: TeCoA and FARE adaptation (benchmarks/vlm_tecoa.py)",
        environment(),
        "",
        (f"Tiny CLIP: ViT image tower {n_visual:,} parameters (32x32 input, patch 4, width 64, 4 blocks), text tower "
        f"{n_text:,} parameters (word tokenizer, {len(vlm.tokenizer.vocab)} words), embedding 64, logit scale "
        f"{vlm.logit_scale:.1f}."),
        (f"Pretrained: CLIP loss on class-name x template captions, {args.pretrain_per_source} train images per set of "
        f"{', '.join(SETS)} (digits: all {1352}), {args.pretrain_epochs} epochs, Adam 2e-3 cosine; "
        f"{card.training.get('cpu_seconds')} CPU s."),
        (f"Adaptation on {args.adapt_on} train ({len(train_data)} images, labels used by TeCoA only), "
        f"{args.adapt_epochs} epochs, batch 128, Adam, cosine; Linf eps {args.train_eps:g}/255; TeCoA: PGD 2 steps of "
        f"eps (Mao et al.), FARE: PGD 10 steps of 2.5 eps/10 (Schlarmann et al.). Learning rates (Adam): fine-tuning "
        f"{args.ft_lr:g}, prompts {args.prompt_lr:g}."),
        (f"Evaluation: zero-shot (class names x templates of robustlab.vlm.prompts), {args.eval_n} random test images "
        f"per set, PGD-{args.pgd_steps} (CE, 1 random start, step 2.5 eps/{args.pgd_steps}) at Linf 1/255 and 4/255; "
        "only clean-correct points are attacked. Accuracies in %."),
        "",
    ]
    head = f"{'model':36s}" + "".join(f"{n[:13]:>22s}" for n in others) + f"{'AVERAGE (others)':>22s}" + \
        f"{args.adapt_on[:13] + ' (train set)':>26s}"
    sub = f"{'':36s}" + "".join(f"{'clean  1/255  4/255':>22s}" for _ in range(len(others) + 1)) + \
        f"{'clean  1/255  4/255':>26s}"
    lines += [head, sub]
    own_key = f"{args.adapt_on} (adapted on)"
    for label, results in rows.items():
        cells = ""
        for n in others:
            cells += "".join(f"{100 * results[n][k]:7.1f}" for k in keys).rjust(22)
        avg = {k: sum(results[n][k] for n in others) / len(others) for k in keys}
        cells += "".join(f"{100 * avg[k]:7.1f}" for k in keys).rjust(22)
        cells += "".join(f"{100 * results[own_key][k]:7.1f}" for k in keys).rjust(26)
        lines.append(f"{label:36s}{cells}")
    lines += ["", "Cost of one adaptation epoch (process CPU time, this process) against the forward+backward floor",
              "of the image encoder over the same images and batch size (the least any training epoch costs):"]
    for label, (per_epoch, floor, loss) in costs.items():
        lines.append(f"  {label:36s} {per_epoch:7.1f} s / {floor:6.1f} s floor = {per_epoch / floor:5.2f}x   "
                     f"trainable parameters {sizes[label]:,}")
    lines += [("  (TeCoA: 2 PGD steps (forward+backward to the input) + 1 training forward+backward, so ~3x the floor "
              "is its own minimum; FARE: 10 PGD steps + 1 training pass + 1 frozen forward of the original encoder.)"),
              "", PUBLISHED]
    report = "\n".join(lines)
    print(report)
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
