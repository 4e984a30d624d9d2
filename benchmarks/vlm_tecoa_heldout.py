"""TeCoA / FARE zero-shot robustness transfer on the tiny CLIP with the evaluation data held out of
pretraining AND adaptation, hyper-parameters chosen on the adaptation set only, paired comparison.

Design (fixed before any run; the numbers did not change it):

1. Pretraining (cached in ``benchmarks/.cache/``): the tiny CLIP, CLIP loss on class-name x template
   captions of 3000 MNIST, 3000 Fashion-MNIST and 3000 CIFAR-10 train images (a seeded random subset of
   the 8,068 shared CIFAR-10 train images), ``--pretrain-epochs`` epochs. The embedded digits are NOT
   pretrained on (unlike ``benchmarks/vlm_tecoa.py``).
2. Adaptation set: CIFAR-10 classes A = the even labels (airplane, bird, deer, frog, ship), train
   images that pretraining did NOT use (the other 5,068 of the shared train set), 5-way zero-shot head.
   The last ``--val-n`` of them are a held-out validation split, never trained on.
3. Grid: TeCoA x training eps {1, 4}/255 x family {fine-tuning: modes full and last:blocks=2 x Adam lr
   ``--ft-lrs``; visual prompts: vpt:pad=2,tokens=8,deep=true x lr ``--vpt-lrs``} x epochs 1..``--epochs``
   (a checkpoint after each epoch); FARE at eps 4/255, full, lr ``--fare-lrs``.
4. Selection per (objective, training eps, family): highest clean + robust (PGD-10 at the training eps)
   zero-shot accuracy on the validation split (classes A). The evaluation sets are not read until then.
5. Evaluation, zero-shot, every model on the same test images with the same attack seeds, clean and
   PGD-10 at Linf 1/255 and 4/255 (the benchmark's fixed PGD, as ``vlm_tecoa_paired.py``):
   - cifar10-B: CIFAR-10 test images of classes B = the odd labels (automobile, cat, dog, horse, truck),
     5-way. Classes never seen in adaptation; images never seen at all; the class concepts were in
     pretraining (as CLIP's web data covers CIFAR's concepts; a word-level text tower cannot name words it
     never read, so fully unseen class NAMES are not possible at this scale).
   - cifar10-B-gray: the same images in grey (luminance): an image distribution seen by neither stage.
   - digits: the embedded 8x8 digits test split upsampled: a data set seen by neither stage (its class
     names are MNIST's words).
   - mnist, fashion_mnist (test): domains of pretraining, not of adaptation (the setting of the earlier
     benchmarks).
   - cifar10-A (test images of the adaptation classes): in-domain, reported apart, not in the average.
   Primary endpoint: the mean over the five held-out sets of robust accuracy at 1/255 and 4/255, paired
   against the original (images only the adapted model gets right vs only the original, exact two-sided
   sign test), and the mean clean accuracy change. Secondary: the natural-image sets (cifar10-B and its
   grey copy) alone.

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/vlm_tecoa_heldout.py`` (about 15 CPU-minutes, pretraining
included); writes ``benchmarks/results/vlm_tecoa_heldout.txt``.

Stronger tiny CLIP on natural images (a second cached model; the adaptation, validation and test images are
the same as above, the grid and sets restricted to keep the CPU cost small), written to
``benchmarks/results/vlm_tecoa_heldout_strong.txt``::

    python benchmarks/vlm_tecoa_heldout.py --pretrain-config '{"vision_width": 96}' --pretrain-epochs 10 \
        --pretrain-cifar-b --pretrain-flip --families fine-tuning --ft-modes full --sets cifar10-B,cifar10-B-gray \
        --per-class-1 --out benchmarks/results/vlm_tecoa_heldout_strong.txt

(``--pretrain-only`` with the same pretraining options prints the model's clean 5-way zero-shot accuracy on
cifar10-B and stops.) ``--pretrain-cifar-b`` adds the classes-B train images outside the pretraining subset:
they are never adaptation or validation images (those are classes A) and never test images.

BROAD ADAPTATION (``--adapt-sets mnist,fashion_mnist,cifar10-A --select balanced``; written to
``benchmarks/results/vlm_tecoa_broad.txt``). Design fixed before any run of it (the held-out runs above found
TeCoA's gains on unseen natural classes to be a class collapse after adapting on 5 CIFAR classes, selected by a
rule blind to collapse):

B1. Pretrained model: the stronger tiny CLIP above (vision width 96, 10 epochs, ``--pretrain-cifar-b
    --pretrain-flip``), re-pretrained with the same options. If CPU allows, the same run on the default tiny
    CLIP as a second, secondary result.
B2. Adaptation set: ONE zero-shot head over 25 classes: MNIST's 10, Fashion-MNIST's 10 and CIFAR-10 classes A's
    5 (each class with its own data set's templates; :func:`robustlab.vlm.prompt_classifier` over the pooled
    caption classes of :func:`robustlab.vlm.pretrain.caption_dataset`; images brought to 32x32x3 as in
    pretraining). Equal images per source: the 2,274 classes-A train images of the runs above, and 2,274 each
    of MNIST and Fashion-MNIST train images that pretraining did not use (the seeded permutation's images after
    the pretraining ones) = 6,822 images. Validation: 300 further unused images per source (classes A: the same
    300 as above) = 900, never trained on.
B3. Grid (small, CPU): TeCoA at eps 1/255 and 4/255 x full fine-tuning x Adam lr {1e-5, 1e-4} (1e-3 collapsed
    above) and visual prompt tuning (vpt:pad=2,tokens=8,deep=true) at lr 1e-2 (the lr of the runs above) x
    epochs 1..2; FARE at 4/255, full, lr 1e-4 (1e-5 only with ``--fare-lrs 1e-5,1e-4`` if CPU allows).
B4. Selection (``--select balanced``), per objective x training eps x family, on the 900 validation images
    with the 25-way training head: the highest balanced clean accuracy + balanced robust accuracy (mean over
    the 25 classes of per-class recall; robust = PGD-10 at the training eps); ties to the smaller lr. The test
    sets are not read until then.
B5. Evaluation as above (400 test images per set, the same images and attack seeds; PGD-10 at 1/255 and 4/255;
    APGD-CE + APGD-DLR on PGD's survivors for the natural sets), each set with its own zero-shot head:
    - held out: cifar10-B (5-way, the odd CIFAR classes, never adapted on: the PRIMARY endpoint), cifar10-B-gray,
      and digits (a data set never seen; note that its class names are MNIST's, which the broad head adapted on,
      so digits tests an unseen image distribution of adapted classes, not unseen classes);
    - in domain, reported apart: cifar10-A, mnist, fashion_mnist test images.
    For every model and test set: the largest share of any one predicted class, clean and under attack (the
    protocol's predictions), beside the constant-classifier level (the largest true-class share), so a
    collapse is visible. Paired sign tests against the original as above.
    Reading fixed in advance: the transfer effect is reproduced if a selected TeCoA model raises robust accuracy
    on cifar10-B at 1/255 or 4/255 significantly (paired sign test, p < 0.05, PGD-10) AND does not collapse
    there: no predicted class takes more than half of the cifar10-B images, clean or under that attack (a
    constant classifier: 100%; the true largest class: 22%), and the gain survives the APGD check.

Runs made (results and summary in ``benchmarks/results/vlm_tecoa_broad.txt``; each file names its command)::

    python benchmarks/vlm_tecoa_heldout.py --pretrain-config '{"vision_width": 96}' --pretrain-epochs 10 \
        --pretrain-cifar-b --pretrain-flip --adapt-sets mnist,fashion_mnist,cifar10-A --select balanced \
        --families fine-tuning,prompts --ft-modes full --ft-lrs 1e-5,1e-4 --vpt-lrs 1e-2 --fare-lrs 1e-4 \
        --train-eps 1,4 --per-class-1 --out benchmarks/results/vlm_tecoa_broad.txt
    # secondary, the default tiny CLIP, fine-tuning family only (CPU):
    python benchmarks/vlm_tecoa_heldout.py --adapt-sets mnist,fashion_mnist,cifar10-A --select balanced \
        --families fine-tuning --ft-modes full --ft-lrs 1e-5,1e-4 --fare-lrs 1e-4 --train-eps 1,4 --per-class-1 \
        --out benchmarks/results/vlm_tecoa_broad_default.txt
    # the same restricted to the selected lr and the natural sets, for the paired tests after APGD:
    ... --ft-lrs 1e-4 --sets cifar10-B,cifar10-B-gray --out benchmarks/results/vlm_tecoa_broad_default_apgd.txt

SELECTION ON HELD-OUT CLASSES (``--select held-classes --select-classes frog,ship``; written to
``benchmarks/results/vlm_tecoa_selectheld.txt``). Design fixed before any run of it (the broad runs' gains on classes
B were a drift onto "cat" that a rule scoring only adaptation-class validation images cannot see; a rule that can
see it needs whole classes held out of adaptation and used only for selection):

S1. Pretrained model: the DEFAULT tiny CLIP (``tiny_clip_heldout_3000_8``, cached; CPU budget), not re-pretrained.
S2. Adaptation: the broad set of B2 with the selection classes removed: ONE 23-way head over MNIST's 10,
    Fashion-MNIST's 10 and CIFAR-10 {airplane, bird, deer} (classes A minus frog, ship). The MNIST / Fashion-MNIST
    images are B2's (2,274 each); the CIFAR images are those of B2's 2,274 classes-A train images whose class is
    airplane, bird or deer (B2's frog and ship images are dropped, never trained on).
S3. Grid (small): TeCoA at eps 1/255 and 4/255 x full fine-tuning x Adam lr {1e-5, 3e-5, 1e-4} x epochs 1..2;
    FARE at 4/255, full, lr {3e-5, 1e-4} x epochs 1..2.
S4. Selection rule: a 5-way zero-shot head over {airplane, bird, deer, frog, ship} (cifar10 templates; two of its
    classes never adapted on, three adapted on through the 23-way head), scored on the 300 validation images of
    classes A of the runs above (never trained on; about 60 per class). Score = balanced clean accuracy + balanced
    robust accuracy (mean per-class recall; robust: PGD-10 at the training eps). A grid point whose largest
    predicted-class share on those images exceeds 50%, clean or under that attack, is not eligible. Per objective x
    training eps (TeCoA 1/255, TeCoA 4/255, FARE 4/255) the rule picks the highest score among the eligible grid
    points AND the original model (scored the same way at that eps; always a candidate), ties to the original, then
    the smaller lr. So the rule may pick "no adaptation". The test sets are not read until then.
S5. Evaluation as B5 (same test images, attack seeds, sets, APGD check, largest shares, paired sign tests before
    and after APGD). The rule's picks are evaluated; where the rule picks the original for a group, that group's
    best-scoring adapted grid point (eligible if any, else the best regardless of eligibility) is evaluated too,
    labelled "(not selected)", to show what the rule turned down. The reading fixed in B5 applies to the rule's
    picks: a selected model shows a non-collapsed robust transfer gain if its robust accuracy on cifar10-B at
    1/255 or 4/255 rises significantly (paired sign test, p < 0.05), no predicted class takes more than half of
    cifar10-B clean or under that attack, and the gain survives APGD. (cifar10-A test images include frog and ship,
    now selection classes, not adapted on; the set stays "in domain" as before.)
    To use both CPU cores the three groups run as two processes (``--train-eps 1 --fare-lrs ''`` and
    ``--train-eps 4 --fare-lrs 3e-5,1e-4``); the rule is per group, so this changes no pick.
    Runs made (added after the runs; the design above unchanged): the default model as planned, then the same two
    commands on the stronger tiny CLIP (its pretraining options as above); commands and summary in
    ``benchmarks/results/vlm_tecoa_selectheld.txt``.

``benchmarks/vlm_tecoa_broad_diag.py``: a post-hoc look at the original model's text geometry (why "cat").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
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
from benchmarks.vlm_tecoa import captions
from benchmarks.vlm_tecoa_paired import per_image, sign_test_two_sided
from robustlab.data import ImageDataset, load_dataset
from robustlab.eval.metrics import balanced_accuracy, largest_class_share
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, train
from robustlab.vlm.adapt import prepare
from robustlab.vlm.pretrain import CaptionSource, caption_dataset, pretrain_tiny_clip
from robustlab.vlm.tiny_clip import (
    TinyCLIPConfig,
    load_tiny_clip,
    read_tiny_clip_card,
    save_tiny_clip,
)
from robustlab.vlm.zeroshot import (
    ZeroShotClassifier,
    fill,
    prompt_classifier,
    text_classifier,
)

EVAL_EPS = (1, 4)
PRETRAIN_VERSION = "tiny-clip-heldout/1"
CLASSES_A = (0, 2, 4, 6, 8)
CLASSES_B = (1, 3, 5, 7, 9)
HELDOUT = ("cifar10-B", "cifar10-B-gray", "digits", "mnist", "fashion_mnist")
NATURAL = ("cifar10-B", "cifar10-B-gray")
VPT_MODE = "vpt:pad=2,tokens=8,deep=true"
ADAPT_SETS = ("mnist", "fashion_mnist", "cifar10-A")
MAX_SHARE = 0.5  # --select held-classes: a larger predicted-class share on validation is not eligible
#: evaluation set -> the adaptation source whose domain it is (in-domain when that source is adapted on)
DOMAIN = {"cifar10-A (in-domain)": "cifar10-A", "mnist": "mnist", "fashion_mnist": "fashion_mnist"}


def cifar_split(root, per_source: int):
    """CIFAR-10 train (8,068 images) split by a seeded permutation: (pretraining indices, the rest)."""
    train = load_dataset("cifar10", "train", root=root)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    return train, perm[:per_source].sort().values, perm[per_source:].sort().values


def take(data, idx, name: str, classes=None, gray: bool = False) -> ImageDataset:
    """``data``'s images ``idx`` as an in-memory set; ``classes``: keep only these labels, renumbered."""
    x, y = data.batch(idx)
    names = list(data.classes)
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        x, y = x[keep], y[keep]
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[list(classes)] = torch.arange(len(classes))
        y, names = remap[y], [names[c] for c in classes]
    if gray:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)
    return ImageDataset(name, "x", x.float().contiguous(), y, names)


def broad_adaptation(args, root, adapt_sets, cifar, pool, n_train, keep_a=None):
    """The pooled adaptation and validation sets over ``adapt_sets`` (one zero-shot head over all their
    classes, each class with its data set's templates): (train, validation, per-class prompts, description).
    MNIST / Fashion-MNIST images: the train images after the pretraining ones in pretraining's permutation.
    ``keep_a``: the positions in classes A adapted on (None: all; the others are selection classes: dropped)."""
    keep_a = tuple(range(len(CLASSES_A))) if keep_a is None else keep_a
    unknown = sorted(set(adapt_sets) - set(ADAPT_SETS))
    if unknown or len(set(adapt_sets)) != len(adapt_sets):
        raise SystemExit(f"--adapt-sets: give distinct names among {', '.join(ADAPT_SETS)}")
    per = args.adapt_per_source or n_train
    train_src, val_src = [], []
    for name in adapt_sets:
        if name == "cifar10-A":
            if per > n_train:
                raise SystemExit(f"--adapt-per-source {per}: classes A have only {n_train} unused train images")
            all_names, templates = captions("cifar10", cifar)
            names = [all_names[CLASSES_A[i]] for i in keep_a]
            tr = take(pool, torch.arange(per), name, list(keep_a))
            va = take(pool, torch.arange(n_train, len(pool)), name, list(keep_a))
        else:
            data = load_dataset(name, "train", root=root)
            unused = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[args.pretrain_per_source:]
            names, templates = captions(name, data)
            tr = take(data, unused[:per].sort().values, name)
            va = take(data, unused[per:per + args.val_n].sort().values, name)
        train_src.append(CaptionSource(name, tr, names, templates))
        val_src.append(CaptionSource(name, va, names, templates))
    size = pretrain_config(args).image_size
    train_data, prompts = caption_dataset(train_src, size)
    val_data, val_prompts = caption_dataset(val_src, size)
    assert prompts == val_prompts
    desc = (f"ONE {len(prompts)}-way zero-shot head over " + " + ".join(
        f"{s.name} ({len(s.classnames)} classes)" for s in train_src) + f"; {per} train images per source "
        f"({len(train_data)} in all) that pretraining did NOT use, as {size}x{size}x3 as in pretraining "
        f"(cifar10-A: the first {per} of the classes-A images outside the pretraining subset"
        + (f", only those of {next(s.classnames for s in train_src if s.name == 'cifar10-A')}: "
           f"{next(len(s.data) for s in train_src if s.name == 'cifar10-A')} images" if len(keep_a) < len(CLASSES_A)
           else "") + ")")
    return train_data, val_data, prompts, desc


def pretrain_config(args) -> TinyCLIPConfig:
    """The tiny CLIP's sizes: the default, with ``--pretrain-config`` overrides (JSON)."""
    return TinyCLIPConfig.from_dict({**TinyCLIPConfig().__dict__, **json.loads(args.pretrain_config or "{}")})


def cache_tag(args) -> str:
    """Cache file stem: the default run's name unchanged; a stronger pretraining adds what differs."""
    tag = f"{args.pretrain_per_source}_{args.pretrain_epochs}"
    if args.pretrain_config:
        cfg = json.loads(args.pretrain_config)
        tag += "_" + "_".join(f"{k}{v}" for k, v in sorted(cfg.items()))
    if args.pretrain_cifar_b:
        tag += "_cifarB"
    if args.pretrain_flip:
        tag += "_flip"
    return tag


def pretrained(args, root) -> Path:
    path = CACHE / f"tiny_clip_heldout_{cache_tag(args)}.safetensors"
    if path.exists() and read_tiny_clip_card(path).training.get("version") == PRETRAIN_VERSION:
        return path
    cifar, pre_idx, rest = cifar_split(root, args.pretrain_per_source)
    if args.pretrain_cifar_b:
        # the classes-B images of the non-pretraining part: never adaptation / validation (classes A), never test
        _x, y_rest = cifar.batch(rest)
        pre_idx = torch.cat([pre_idx, rest[torch.isin(y_rest, torch.tensor(CLASSES_B))]]).sort().values
    sources = []
    for name in ("mnist", "fashion_mnist"):
        data = load_dataset(name, "train", root=root)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.pretrain_per_source]
        sources.append(CaptionSource(name, take(data, idx.sort().values, name), *captions(name, data)))
    cifar_pre = take(cifar, pre_idx, "cifar10")
    if args.pretrain_flip:  # static augmentation: every CIFAR image also mirrored left-right
        cifar_pre = ImageDataset("cifar10", "x", torch.cat([cifar_pre.x, cifar_pre.x.flip(3)]),
                                 torch.cat([cifar_pre.y, cifar_pre.y]), list(cifar_pre.classes))
    sources.append(CaptionSource("cifar10", cifar_pre, *captions("cifar10", cifar)))
    cfg = TrainConfig(epochs=args.pretrain_epochs, batch_size=128, lr=2e-3, optimizer="adam", weight_decay=1e-4,
                      warmup_epochs=0.5, seed=0)
    log(f"pretraining the tiny CLIP (mnist, fashion_mnist {args.pretrain_per_source} each, cifar10 {len(pre_idx)} "
        f"images{' + flips' if args.pretrain_flip else ''}, {args.pretrain_epochs} epochs, {pretrain_config(args)})")
    state = CACHE / f"tiny_clip_heldout_{cache_tag(args)}_pretrain.train"
    if cache_tag(args) == f"{args.pretrain_per_source}_{args.pretrain_epochs}":
        state = CACHE / "tiny_clip_heldout_pretrain.train"  # the default run's checkpoint folder, as before
    t0 = time.process_time()
    model, _history, described = pretrain_tiny_clip(sources, pretrain_config(args), cfg, progress=True,
                                                    checkpoint_dir=str(state), resume=(state / "state.json").exists())
    described.update(version=PRETRAIN_VERSION, cpu_seconds=round(time.process_time() - t0, 1),
                     cifar10_images=len(pre_idx), flip=bool(args.pretrain_flip))
    save_tiny_clip(model, path, described, notes="pretrained by benchmarks/vlm_tecoa_heldout.py")
    return path


def stronger(clf, x, y, robust: torch.Tensor, eps: int, steps: int = 50, chunk: int = 250) -> torch.Tensor:
    """``robust`` after APGD-CE then APGD-DLR (``steps`` each, seeded) on the images PGD left correct:
    the per-image worst case of the three attacks (a check of the fixed protocol's PGD)."""
    from robustlab.attacks import create_attack
    from robustlab.models.runtime import eval_mode

    out = robust.clone()
    for name in ("apgd-ce", "apgd-dlr"):
        attack = create_attack(name, ThreatModel("linf", eps / 255), steps=steps)
        idx = out.nonzero().flatten()
        for i in range(0, len(idx), chunk):
            j = idx[i:i + chunk]
            x_adv = attack.run(clf, x[j], y[j], torch.Generator().manual_seed(11 + i)).x_adv
            with torch.no_grad(), eval_mode(clf):
                out[j] = clf(x_adv).argmax(1) == y[j]
    return out


def run_adaptation(path, data, prompts, objective, mode, config, on_epoch):
    """One adaptation in the loop (as :func:`robustlab.vlm.adapt.adapt`; the head: each class's
    ``prompts``), with ``on_epoch(record, adapted)`` so the prompts of vpt are visible to the callback."""
    vlm = load_tiny_clip(path).eval()
    if getattr(objective, "original", "absent") is None:
        objective.bind_original(copy.deepcopy(vlm))
    weights = prompt_classifier(vlm, prompts)
    adapted = prepare(vlm, mode, torch.Generator().manual_seed(config.seed))
    model = ZeroShotClassifier(adapted, weights)
    train(model, data, config, objective, progress=False, on_epoch=lambda r: on_epoch(r, adapted))


def rebuild(path, row):
    vlm = load_tiny_clip(path).eval()
    if row is None:
        return vlm
    adapted = prepare(vlm, row["mode"])
    adapted.load_state_dict(row["state"])
    return adapted.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val-n", type=int, default=300, help="held-out validation images of the adaptation set")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (a checkpoint after each is a grid point)")
    ap.add_argument("--ft-lrs", default="1e-4,1e-3", help="Adam learning rates of fine-tuning")
    ap.add_argument("--vpt-lrs", default="1e-2", help="Adam learning rates of visual prompt tuning")
    ap.add_argument("--fare-lrs", default="1e-4", help="Adam learning rates of FARE (full fine-tuning, eps 4/255)")
    ap.add_argument("--train-eps", default="1,4", help="TeCoA training epsilons in 1/255, comma-separated")
    ap.add_argument("--eval-n", type=int, default=400, help="at most this many test images per evaluation set (random, fixed seed)")
    ap.add_argument("--out", default=str(RESULTS / "vlm_tecoa_heldout.txt"), help="results file")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--pretrain-per-source", type=int, default=3000)
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--pretrain-config", default="",
                    help='JSON overrides of the tiny CLIP sizes, e.g. \'{"vision_width": 96}\' (a separate cached model)')
    ap.add_argument("--pretrain-cifar-b", action="store_true",
                    help="also pretrain on the classes-B train images outside the pretraining subset (never adapted on)")
    ap.add_argument("--pretrain-flip", action="store_true", help="pretrain on the CIFAR images and their mirror images")
    ap.add_argument("--pretrain-only", action="store_true",
                    help="pretrain, print the clean 5-way zero-shot accuracy on cifar10-B, stop")
    ap.add_argument("--families", default="fine-tuning,prompts", help="adaptation families of TeCoA in the grid")
    ap.add_argument("--ft-modes", default="full,last:blocks=2", help="fine-tuning modes in the grid")
    ap.add_argument("--sets", default=",".join(("cifar10-A (in-domain)", *HELDOUT)),
                    help="evaluation sets (means are over the chosen ones of each group)")
    ap.add_argument("--per-class-1", action="store_true", help="also print per-class robust accuracy at 1/255")
    ap.add_argument("--adapt-sets", default="cifar10-A",
                    help="adaptation sources, one zero-shot head over all their classes: cifar10-A (the default, "
                         "the held-out runs) or several of " + ", ".join(ADAPT_SETS) + " (broad adaptation)")
    ap.add_argument("--adapt-per-source", type=int, default=0,
                    help="broad adaptation: train images per source (0: as many as classes A have, 2274)")
    ap.add_argument("--select", default="clean+robust", choices=("clean+robust", "balanced", "held-classes"),
                    help="selection on validation: clean + robust accuracy (the held-out runs), balanced clean + "
                         "balanced robust accuracy (mean per-class recall over the adaptation classes), or "
                         "held-classes (docstring S4: a 5-way head over classes A, --select-classes never adapted on; "
                         "largest predicted share above 50%% not eligible; the original always a candidate)")
    ap.add_argument("--select-classes", default="frog,ship",
                    help="with --select held-classes: CIFAR-10 classes A taken out of adaptation, used only to select")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    root = shared_data_dir()
    t_start = time.process_time()
    path = pretrained(args, root)
    t_pre = read_tiny_clip_card(path).training.get("cpu_seconds")
    if args.pretrain_only:
        test = load_dataset("cifar10", "test", root=root)
        data = take(test, torch.arange(len(test)), "cifar10-B", CLASSES_B)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:args.eval_n].sort().values
        data = take(data, idx, data.name)
        names, templates = captions("cifar10", test)
        model = load_tiny_clip(path).eval()
        clf = ZeroShotClassifier(model, text_classifier(model, [names[c] for c in CLASSES_B], templates))
        with torch.no_grad():
            acc = float((clf(data.x).argmax(1) == data.y).float().mean())
        log(f"{path.name}: clean 5-way zero-shot accuracy on cifar10-B ({len(data)} test images) {100 * acc:.1f}% "
            f"(pretraining {t_pre} CPU s)")
        return

    cifar, _pre_idx, rest = cifar_split(root, args.pretrain_per_source)
    pool = take(cifar, rest, "cifar10-A", CLASSES_A)
    n_train = len(pool) - args.val_n
    names, templates = captions("cifar10", cifar)
    names_a = [names[c] for c in CLASSES_A]
    adapt_sets = args.adapt_sets.split(",")
    if adapt_sets == ["cifar10-A"]:  # the held-out runs: classes A alone, 5-way head
        train_data = take(pool, torch.arange(n_train), "cifar10-A")
        val_x, val_y = pool.batch(torch.arange(n_train, len(pool)))
        prompts_a = [[fill(t, n) for t in templates] for n in names_a]
        sources_desc = f"CIFAR-10 classes A {names_a} (even labels), {n_train} train images"
    else:
        keep_a = tuple(range(len(CLASSES_A)))
        if args.select == "held-classes":
            held = args.select_classes.split(",")
            if "cifar10-A" not in adapt_sets or not set(held) < set(names_a) or len(set(held)) != len(held):
                raise SystemExit(f"--select-classes: give distinct names among {', '.join(names_a)} (not all), "
                                 "with cifar10-A in --adapt-sets")
            keep_a = tuple(i for i, n in enumerate(names_a) if n not in held)
        train_data, val_data, prompts_a, sources_desc = broad_adaptation(args, root, adapt_sets, cifar, pool, n_train,
                                                                         keep_a)
        val_x, val_y = val_data.x, val_data.y
    original = load_tiny_clip(path)
    held_classes = args.select == "held-classes"
    if held_classes:  # S4: the 5-way head over classes A on their 300 validation images (selection classes included)
        val_x, val_y = pool.batch(torch.arange(n_train, len(pool)))
        val_head = prompt_classifier(original, [[fill(t, n) for t in templates] for n in names_a])
        n_val_classes = len(names_a)
    else:
        val_head = prompt_classifier(original, prompts_a)
        n_val_classes = len(prompts_a)
    train_eps = [int(v) for v in args.train_eps.split(",")]

    def val_score(vlm, eps):
        """(clean, robust, balanced clean, balanced robust, largest predicted share clean, attacked) on the
        validation images."""
        preds = {}
        r = per_image(ZeroShotClassifier(vlm, val_head), val_x, val_y, [eps], args.pgd_steps, seed=7, preds=preds)
        k = n_val_classes
        return (float(r["clean"].float().mean()), float(r[f"{eps}/255"].float().mean()),
                balanced_accuracy(r["clean"], val_y, k), balanced_accuracy(r[f"{eps}/255"], val_y, k),
                largest_class_share(preds["clean"], k)[1], largest_class_share(preds[f"{eps}/255"], k)[1])

    val_original = {e: val_score(original, e) for e in train_eps}
    log(f"original on validation: {val_original}")

    # ---------------------------------------------------------------- grid + selection on validation
    runs = []  # (objective, eps, family, mode, lr)
    for eps in train_eps:
        if "fine-tuning" in args.families.split(","):
            for mode in args.ft_modes.split(","):
                runs += [("tecoa", eps, "fine-tuning", mode, float(lr)) for lr in args.ft_lrs.split(",")]
        if "prompts" in args.families.split(","):
            runs += [("tecoa", eps, "prompts", VPT_MODE, float(lr)) for lr in args.vpt_lrs.split(",")]
    if args.fare_lrs:
        runs += [("fare", 4, "fine-tuning", "full", float(lr)) for lr in args.fare_lrs.split(",")]
    grid = []
    for objective_name, eps, family, mode, lr in runs:
        objective = create_objective(objective_name, ThreatModel("linf", eps / 255),
                                     steps=2 if objective_name == "tecoa" else 10)
        config = TrainConfig(epochs=args.epochs, batch_size=128, lr=lr, optimizer="adam", weight_decay=0.0,
                             warmup_epochs=0.0, seed=args.seed)

        def on_epoch(record, adapted, objective_name=objective_name, eps=eps, family=family, mode=mode, lr=lr):
            c, rb, bc, brb, sh_c, sh_r = val_score(adapted, eps)
            grid.append({"objective": objective_name, "eps": eps, "family": family, "mode": mode, "lr": lr,
                         "epoch": record["epoch"], "clean": c, "robust": rb, "bal_clean": bc, "bal_robust": brb,
                         "share": max(sh_c, sh_r), "eligible": max(sh_c, sh_r) <= MAX_SHARE,
                         "score": bc + brb if args.select != "clean+robust" else c + rb,
                         "state": copy.deepcopy(adapted.state_dict())})
            log(f"  {objective_name} eps {eps}/255 {mode} lr {lr:g} epoch {record['epoch']}: val clean "
                f"{100 * c:.1f} robust {100 * rb:.1f}, balanced {100 * bc:.1f} / {100 * brb:.1f}, largest share "
                f"{100 * sh_c:.0f} / {100 * sh_r:.0f} "
                f"(loss {record['loss']:.4f}, {time.process_time() - t_start:.0f} CPU s)")

        run_adaptation(path, train_data, prompts_a, objective, mode, config, on_epoch)
    selected, picks = {}, []
    for key in sorted({(g["objective"], g["eps"], g["family"]) for g in grid}, key=lambda k: (k[0] != "tecoa", k)):
        rows = [g for g in grid if (g["objective"], g["eps"], g["family"]) == key]
        best = max(rows, key=lambda g: (round(g["score"], 6), -g["lr"]))
        group = f"{'TeCoA' if key[0] == 'tecoa' else 'FARE'} {key[1]}/255 {key[2]}"
        label = f"{group}: {best['mode']}, lr {best['lr']:g}, {best['epoch']} ep"
        if held_classes:  # S4: eligible grid points and the original; ties to the original, then the smaller lr
            eligible = [g for g in rows if g["eligible"]]
            best = max(eligible, key=lambda g: (round(g["score"], 6), -g["lr"])) if eligible else None
            v = val_original[key[1]]
            if best is None or round(best["score"], 6) <= round(v[2] + v[3], 6):
                shown = max(eligible or rows, key=lambda g: (round(g["score"], 6), -g["lr"]))
                picks.append(f"{group}: the ORIGINAL (no adaptation)")
                label = (f"{group}: {shown['mode']}, lr {shown['lr']:g}, {shown['epoch']} ep (not selected"
                         + ("" if eligible else ", not eligible") + ")")
                best = shown
            else:
                picks.append(label)
        selected[label] = best
    t_grid = time.process_time() - t_start
    log(f"grid done ({t_grid:.0f} CPU s); selected: {picks or list(selected)}")

    # ---------------------------------------------------------------- evaluation (read only now)
    test = load_dataset("cifar10", "test", root=root)
    all_idx = torch.arange(len(test))
    eval_sets = {
        "cifar10-A (in-domain)": take(test, all_idx, "cifar10-A", CLASSES_A),
        "cifar10-B": take(test, all_idx, "cifar10-B", CLASSES_B),
        "cifar10-B-gray": take(test, all_idx, "cifar10-B-gray", CLASSES_B, gray=True),
        "digits": load_dataset("digits", "test"),
    }
    for name in ("mnist", "fashion_mnist"):
        eval_sets[name] = load_dataset(name, "test", root=root)
    eval_sets = {k: v for k, v in eval_sets.items() if k in args.sets.split(",")}
    for key, data in eval_sets.items():
        if len(data) > args.eval_n:
            idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:args.eval_n].sort().values
            eval_sets[key] = take(data, idx, data.name)
    prompts = {}
    for key, data in eval_sets.items():
        base = "cifar10" if key.startswith("cifar10") else key
        prompts[key] = ([captions("cifar10", cifar)[0][c] for c in (CLASSES_A if "-A" in key else CLASSES_B)]
                        if base == "cifar10" else captions(base, data)[0], captions(base, data)[1])
    adapted_domains = set(adapt_sets)
    groups = {"heldout": [n for n in HELDOUT if n in eval_sets and DOMAIN.get(n) not in adapted_domains],
              "indomain": [n for n in eval_sets if DOMAIN.get(n) in adapted_domains]}
    results, shares = {}, {}
    for label, row in {"original": None, **selected}.items():
        model = rebuild(path, row)
        results[label], shares[label] = {}, {}
        for key, data in eval_sets.items():
            clf = ZeroShotClassifier(model, text_classifier(model, *prompts[key]))
            preds = {}
            results[label][key] = per_image(clf, data.x, data.y, EVAL_EPS, args.pgd_steps, preds=preds)
            shares[label][key] = {k: largest_class_share(v, len(data.classes)) for k, v in preds.items()}
            if key in NATURAL:
                for e in EVAL_EPS:
                    results[label][key][f"{e}/255 strong"] = stronger(clf, data.x, data.y,
                                                                     results[label][key][f"{e}/255"], e)
            log(f"  {label} on {key}: " + ", ".join(f"{k} {100 * float(v.float().mean()):.1f}"
                                                     for k, v in results[label][key].items()))
        report = render(args, path, t_pre, sources_desc, len(val_y), eval_sets, results, grid, selected, val_original,
                        time.process_time() - t_start, t_grid, groups, shares, picks)
        write_report(report, Path(args.out))


def paired(res, base, keys_sets, k):
    """(wins, losses, p, mean diff, its SE) of ``res`` against ``base`` on sets ``keys_sets`` for ``k``."""
    tw = tl = 0
    diffs, var = [], 0.0
    for n in keys_sets:
        a, b = res[n][k], base[n][k]
        w, lo, m = int((a & ~b).sum()), int((~a & b).sum()), len(a)
        tw, tl = tw + w, tl + lo
        d = (w - lo) / m
        diffs.append(d)
        var += ((w + lo) / m - d * d) / m
    return tw, tl, sign_test_two_sided(tw, tl), sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


def render(args, path, t_pre, sources_desc, n_val, eval_sets, results, grid, selected, val_original, cpu, t_grid,
           groups, shares, picks=()) -> str:
    keys = ["clean", *[f"{e}/255" for e in EVAL_EPS]]
    card = read_tiny_clip_card(path).training
    sizes = ", ".join(f"{n} {len(d)}" for n, d in eval_sets.items())
    broad = args.adapt_sets != "cifar10-A"
    heldout, indomain = groups["heldout"], groups["indomain"]
    balanced = args.select != "clean+robust"
    held = args.select == "held-classes"
    lines = [
        ("Zero-shot robustness transfer with held-out evaluation data: tiny CLIP, TeCoA / FARE adapted on "
         + (f"{args.adapt_sets} with one head" if broad else "CIFAR-10 classes A") + " (benchmarks/vlm_tecoa_heldout.py)"),
        "Command: OMP_NUM_THREADS=1 nice python benchmarks/vlm_tecoa_heldout.py " + shlex.join(sys.argv[1:]),
        environment(),
        "",
        (f"Pretraining: {path.name}: CLIP loss on captions of {args.pretrain_per_source} train images each of mnist, "
         f"fashion_mnist and {card.get('cifar10_images', args.pretrain_per_source)} of cifar10 (all 10 classes"
         f"{'; + the classes-B train images outside the pretraining subset' if args.pretrain_cifar_b else ''}"
         f"{'; each also mirrored' if args.pretrain_flip else ''}), {args.pretrain_epochs} epochs, Adam 2e-3 cosine; "
         f"no digits; tiny CLIP {pretrain_config(args)}; {t_pre} CPU s in the session that finished it (a resumed "
         "pretraining counts only its last session)."),
        (f"Adaptation: {sources_desc}" + ("" if broad else " NOT used in pretraining") + (
            f"; validation: {n_val} further images ({args.val_n} per source, never trained on)" if not held else "")
         + f". Batch 128, Adam, cosine over {args.epochs} epochs, no "
         f"weight decay, seed {args.seed}. TeCoA: PGD 2 steps of eps; FARE: PGD 10 steps."),
        (f"Grid: TeCoA eps {args.train_eps}/255 x families {args.families} [fine-tuning: {args.ft_modes} x lr "
         f"{args.ft_lrs}; prompts: {VPT_MODE} x lr {args.vpt_lrs}] x epochs 1..{args.epochs}; FARE eps 4/255 full x lr "
         f"{args.fare_lrs or 'none'}."),
        ("Selection (fixed before the run): per objective x training eps x family, the highest "
         + ("BALANCED clean + BALANCED robust (mean over the adaptation classes of per-class recall; robust: "
            if balanced and not held else "clean + robust (" if not held else
            "BALANCED clean + BALANCED robust (mean per-class recall; robust: ")
         + f"PGD-{args.pgd_steps} at the training eps) zero-shot accuracy on the validation images"
         + (" with the training head" if balanced and not held else "") + ", ties to the smaller lr."
         + (f" HELD-OUT CLASSES (docstring S4): the validation images are the {n_val} classes-A validation images "
            f"with a 5-way head over classes A, of which {args.select_classes} were never adapted on; a grid point "
            f"whose largest predicted share there exceeds {100 * MAX_SHARE:.0f}% (clean or attacked) is not "
            "eligible; the original is always a candidate (ties to it)." if held else "")),
        (f"Evaluation: zero-shot, each set with its own head, same images and attack seeds for every model ({sizes}); "
         f"PGD-{args.pgd_steps} (CE, 1 random start, step 2.5 eps/{args.pgd_steps}) at Linf 1/255 and 4/255, at the "
         "data's own resolution; only clean-correct images attacked. cifar10-B = test images of the odd classes "
         "(5-way), never in adaptation."),
        f"Held-out sets (no adaptation on their domain): {', '.join(heldout)}; in-domain sets: {', '.join(indomain) or 'none'}.",
        f"CPU: grid {t_grid:.0f} s, total so far {cpu:.0f} s (process time, 1 thread).",
        "",
        ("Validation grid (held-out adaptation images; %" if not held else "Validation grid (the selection head over "
         "classes A on their validation images; %") + ("; balanced = mean per-class recall" if balanced else "") + "):",
        "  original: " + ", ".join(f"clean {100 * v[0]:.1f} robust@{e}/255 {100 * v[1]:.1f}"
                                   + (f" (balanced {100 * v[2]:.1f} / {100 * v[3]:.1f})" if balanced else "")
                                   + (f" largest share {100 * max(v[4], v[5]):.0f}" if held else "")
                                   + (f" score {100 * (v[2] + v[3]):.1f}" if held else "")
                                   for e, v in val_original.items()),
    ]
    for g in grid:
        lines.append(f"  {g['objective']:5s} eps {g['eps']}/255  {g['mode']:30s} lr {g['lr']:<7g} ep {g['epoch']}   "
                     f"val clean {100 * g['clean']:5.1f}  robust {100 * g['robust']:5.1f}  "
                     + (f"balanced {100 * g['bal_clean']:5.1f} / {100 * g['bal_robust']:5.1f}  " if balanced else "")
                     + (f"largest share {100 * g['share']:3.0f}{'' if g['eligible'] else ' NOT eligible'}  "
                        if held else "")
                     + f"score {100 * g['score']:6.1f}")
    lines += ["", "Selected: " + "; ".join(picks or selected), "", "Zero-shot accuracy (%) on the test images (clean / 1/255 / 4/255):"]
    cols = list(eval_sets)
    lines.append(f"{'model':66s}" + "".join(f"{c[:21]:>22s}" for c in cols) + f"{'MEAN held-out':>22s}{'MEAN natural':>22s}")
    for label, res in results.items():
        cells = "".join("".join(f"{100 * float(res[n][k].float().mean()):7.1f}" for k in keys).rjust(22) for n in cols)
        for group in (heldout, NATURAL):
            group = [n for n in group if n in res]
            avg = [sum(float(res[n][k].float().mean()) for n in group) / max(len(group), 1) for k in keys]
            cells += "".join(f"{100 * a:7.1f}" for a in avg).rjust(22)
        lines.append(f"{label:66s}{cells}")
    lines += [f"  (in-domain sets {', '.join(indomain) or 'none'}: not in the means.)", "",
              "Largest share (%) of any one predicted class, clean / under PGD-10 at 1/255 / at 4/255 (the protocol's",
              "predictions: attacked images after the attack, the others as predicted clean), and the class. A constant",
              "classifier: 100; evenly spread predictions: 100/classes. Constant-classifier ACCURACY (largest true class): "
              + ", ".join(f"{n} {100 * float(torch.bincount(d.y).max()) / len(d):.1f}%" for n, d in eval_sets.items()) + "."]
    lines.append(f"{'model':66s}" + "".join(f"{c[:21]:>22s}" for c in cols))
    for label, per_set in shares.items():
        cells = "".join("".join(f"{100 * per_set[n][k][1]:7.1f}" for k in keys).rjust(22) for n in cols)
        lines.append(f"{label:66s}{cells}")
        cells = "".join(("  " + "/".join(eval_sets[n].classes[per_set[n][k][0]][:6] for k in keys))[-22:].rjust(22)
                        for n in cols)
        lines.append(f"{'':66s}{cells}")
    lines += ["", "Paired against the original: wins/losses = images only the adapted / only the original gets right, pooled;",
              "p = exact two-sided sign test; diff = mean over the sets of the per-set accuracy difference +- paired SE."]
    base = results["original"]
    for label, res in results.items():
        if label == "original":
            continue
        lines.append(f"  {label}")
        rows = [(f"held-out ({len([n for n in heldout if n in res])} sets)", heldout), ("natural (cifar10-B, gray)", NATURAL)]
        if broad:
            rows += [(n, (n,)) for n in heldout]
        rows.append((f"in-domain ({len(indomain)} sets)" if broad else "in-domain cifar10-A", indomain))
        for title, group in rows:
            parts = []
            group = [n for n in group if n in res]
            if not group:
                continue
            for k in keys:
                w, lo, p, d, se = paired(res, base, group, k)
                parts.append(f"{k} {100 * d:+5.1f}+-{100 * se:.1f} ({w}/{lo}, p {p:.2g})")
            lines.append(f"    {title:26s} " + "; ".join(parts))
    lines += ["", "Check of the PGD-10 figures on the natural sets: robust accuracy (%) after APGD-CE + APGD-DLR (50 steps",
              "each) on the images PGD-10 left correct (per-image worst case), and per class at 4/255 after it. A",
              "constant classifier scores the largest class share (" + ", ".join(
                  f"{n} {100 * float(torch.bincount(eval_sets[n].y).max()) / len(eval_sets[n]):.1f}%" for n in NATURAL
                  if n in eval_sets) + ")."]
    for label, res in results.items():
        parts = []
        for n in NATURAL:
            if n not in res:
                continue
            strong = ", ".join(f"{e}/255 {100 * float(res[n][f'{e}/255'].float().mean()):.1f} -> "
                               f"{100 * float(res[n][f'{e}/255 strong'].float().mean()):.1f}" for e in EVAL_EPS)
            y = eval_sets[n].y
            per_class = {e: "/".join(f"{100 * float(res[n][f'{e}/255 strong'][y == c].float().mean()):.0f}"
                                     for c in range(len(eval_sets[n].classes))) for e in EVAL_EPS}
            parts.append(f"{n}: {strong}; per class at 4/255 {per_class[4]}"
                         + (f" (at 1/255 {per_class[1]})" if args.per_class_1 else ""))
        lines.append(f"  {label:66s} " + " | ".join(parts))
    lines.append("  (classes in order: " + ", ".join(eval_sets[NATURAL[0]].classes) + ")")
    lines += ["Paired against the original AFTER the APGD check (same tests as above, on the per-image worst case):"]
    for label, res in results.items():
        if label == "original":
            continue
        parts = []
        for n in (n for n in NATURAL if n in res):
            for e in EVAL_EPS:
                w, lo, p, d, _se = paired(res, base, [n], f"{e}/255 strong")
                parts.append(f"{n} {e}/255 {100 * d:+.1f} ({w}/{lo}, p {p:.2g})")
        lines.append(f"  {label:66s} " + "; ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
