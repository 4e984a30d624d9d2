"""Zero-shot robustness transfer of TeCoA / FARE on the tiny CLIP, measured paired and with the
hyper-parameters chosen on the adaptation set only.

1. The tiny CLIP pretrained by ``benchmarks/vlm_tecoa.py`` (cached in ``benchmarks/.cache/``).
2. A grid of adaptations on ONE data set (``--adapt-on``; ``--adapt-n`` train images): objective
   (TeCoA, optionally FARE), mode (``--modes``), Adam learning rate (``--lrs``), training epsilon
   (``--train-eps``), each run for ``--epochs`` epochs (cosine schedule) with a checkpoint after every
   epoch, so the number of epochs is in the grid too.
3. Selection, per objective and training epsilon, on a held-out VALIDATION split of the adaptation
   set's train images (``--val-n`` images after the training ones, never used to train): the grid
   point with the highest clean + robust zero-shot accuracy there (PGD-10 at the training epsilon).
   The evaluation sets are never looked at until the selection is made.
4. Every selected model and the original are evaluated zero-shot on the same test images of every
   data set (``--eval-n`` per set, all of digits' test split), clean and PGD-10 at Linf 1/255 and
   4/255 (same attack seeds for every model). Per image: right or wrong. Paired comparison with the
   original on the OTHER data sets: images only the adapted model gets right vs only the original,
   exact two-sided sign test (McNemar), and the average accuracy difference over the other sets with
   its paired standard error.

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/vlm_tecoa_paired.py --adapt-on fashion_mnist``;
writes ``benchmarks/results/vlm_tecoa_paired_<adapt-on>[_<tag>].txt``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    environment,
    log,
    set_threads,
    shared_data_dir,
    write_report,
)
from benchmarks.vlm_tecoa import SETS, captions, pretrained
from robustlab.attacks import create_attack
from robustlab.data import load_dataset
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective
from robustlab.vlm.adapt import adapt
from robustlab.vlm.tiny_clip import load_tiny_clip
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier

EVAL_EPS = (1, 4)


def per_image(clf, x, y, eps_list, steps, seed=0, chunk=250, preds=None) -> dict[str, torch.Tensor]:
    """Per image (bool): clean-correct, and per epsilon correct after PGD (CE, 1 random start, step
    2.5 eps/steps; only clean-correct images attacked, so robust-correct implies clean-correct). The
    attack's random start is seeded per chunk of the data, the same for every model. ``preds`` (a
    dict): filled with the predicted classes, clean and per epsilon under the protocol (the attacked
    images' predictions after PGD, the clean prediction of the images not attacked)."""
    with eval_mode(clf), torch.no_grad():
        pred = torch.cat([clf(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
    ok = pred == y
    out = {"clean": ok}
    if preds is not None:
        preds["clean"] = pred
    for e in eps_list:
        attack = create_attack("pgd", ThreatModel("linf", e / 255), steps=steps)
        rob = torch.zeros_like(ok)
        pred_e = pred.clone()
        for i in range(0, len(x), chunk):
            j = torch.arange(i, min(i + chunk, len(x)))
            j = j[ok[j]]
            if len(j) == 0:
                continue
            g = torch.Generator().manual_seed(seed + i)
            x_adv = attack.run(clf, x[j], y[j], g).x_adv
            with torch.no_grad(), eval_mode(clf):
                p_adv = clf(x_adv).argmax(1)
            rob[j] = p_adv == y[j]
            if preds is not None:
                pred_e[j] = p_adv
        out[f"{e}/255"] = rob
        if preds is not None:
            preds[f"{e}/255"] = pred_e
    return out


def sign_test_two_sided(wins: int, losses: int) -> float:
    from scipy.stats import binomtest

    n = wins + losses
    return 1.0 if n == 0 else float(binomtest(wins, n, 0.5).pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapt-on", default="fashion_mnist", choices=SETS)
    ap.add_argument("--adapt-n", type=int, default=3000, help="training images of the adaptation set")
    ap.add_argument("--val-n", type=int, default=300, help="held-out validation images (train split, after the training ones)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (a checkpoint after each is a grid point)")
    ap.add_argument("--modes", default="last:blocks=2,full", help="adaptation modes, comma-separated")
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="Adam learning rates, comma-separated")
    ap.add_argument("--train-eps", default="1,4", help="training epsilons in 1/255, comma-separated")
    ap.add_argument("--objectives", default="tecoa", help="tecoa and/or fare, comma-separated")
    ap.add_argument("--eval-n", type=int, default=1000, help="test images per data set (random, fixed seed)")
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--pretrain-per-source", type=int, default=3000)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="training seed (batch order, attack starts inside training)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    root = shared_data_dir()
    path = pretrained(args)
    t_start = time.process_time()

    def rootfor(name):
        return None if name == "digits" else root

    train_full = load_dataset(args.adapt_on, "train", root=rootfor(args.adapt_on))
    names, templates = captions(args.adapt_on, train_full)
    train_data = train_full.subset(args.adapt_n)
    val_x, val_y = train_full.batch(range(args.adapt_n, min(len(train_full), args.adapt_n + args.val_n)))

    # ---------------------------------------------------------------- grid + selection on validation
    modes = [m.strip() for m in args.modes.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    train_eps = [int(v) for v in args.train_eps.split(",")]
    objectives = [o.strip() for o in args.objectives.split(",")]
    grid_rows = []  # (objective, eps, mode, lr, epoch, val clean, val robust, score, visual state)
    base_cfg = {"epochs": args.epochs, "batch_size": 128, "optimizer": "adam", "weight_decay": 0.0,
                "warmup_epochs": 0.0, "seed": args.seed}
    original = load_tiny_clip(path)
    val_head = text_classifier(original, names, templates)
    o = per_image(ZeroShotClassifier(original, val_head), val_x, val_y, train_eps, args.pgd_steps, seed=7)
    val_original = {e: (float(o["clean"].float().mean()), float(o[f"{e}/255"].float().mean())) for e in train_eps}
    for objective_name in objectives:
        for eps in train_eps:
            for mode in modes if objective_name == "tecoa" else ["full"]:
                for lr in lrs:
                    vlm = load_tiny_clip(path)
                    params = {"steps": 2} if objective_name == "tecoa" else {"steps": 10}
                    objective = create_objective(objective_name, ThreatModel("linf", eps / 255), **params)

                    def on_epoch(record, vlm=vlm, eps=eps, mode=mode, lr=lr, objective_name=objective_name):
                        clf = ZeroShotClassifier(vlm, val_head)
                        r = per_image(clf, val_x, val_y, [eps], args.pgd_steps, seed=7)
                        c, rb = float(r["clean"].float().mean()), float(r[f"{eps}/255"].float().mean())
                        state = copy.deepcopy(vlm.visual.state_dict())
                        grid_rows.append((objective_name, eps, mode, lr, record["epoch"], c, rb, c + rb, state))
                        log(f"  {objective_name} eps {eps}/255 {mode} lr {lr:g} epoch {record['epoch']}: "
                            f"val clean {100 * c:.1f} robust {100 * rb:.1f} (loss {record['loss']:.4f})")

                    adapt(vlm, train_data, names, templates, objective, mode, TrainConfig(lr=lr, **base_cfg),
                          progress=False, on_epoch=on_epoch)
    selected = {}
    for objective_name in objectives:
        for eps in train_eps:
            rows = [r for r in grid_rows if r[0] == objective_name and r[1] == eps]
            best = max(rows, key=lambda r: (round(r[7], 6), -r[3]))
            selected[f"{objective_name.upper() if objective_name == 'fare' else 'TeCoA'} {eps}/255: {best[2]}, "
                     f"lr {best[3]:g}, {best[4]} ep"] = best
    t_grid = time.process_time() - t_start
    log(f"grid done in {t_grid:.0f} CPU s; selected: {list(selected)}")

    # ---------------------------------------------------------------- evaluation, paired
    eval_sets = {}
    for name in SETS:
        test = load_dataset(name, "test", root=rootfor(name))
        n = min(args.eval_n, len(test))
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:n].sort().values
        x, y = test.batch(idx)
        eval_sets[name] = (x, y, *captions(name, test))
    others = [n for n in SETS if n != args.adapt_on]
    results = {}
    lines_head = []

    def model_for(row):
        vlm = load_tiny_clip(path)
        if row is not None:
            vlm.visual.load_state_dict(row[8])
        return vlm.eval()

    for label, row in {"original": None, **selected}.items():
        vlm = model_for(row)
        results[label] = {}
        for name, (x, y, cn, tp) in eval_sets.items():
            clf = ZeroShotClassifier(vlm, text_classifier(vlm, cn, tp))
            results[label][name] = per_image(clf, x, y, EVAL_EPS, args.pgd_steps)
            log(f"  {label} on {name}: " + ", ".join(f"{k} {100 * float(v.float().mean()):.1f}"
                                                      for k, v in results[label][name].items()))
        report = render(args, path, eval_sets, others, results, grid_rows, selected, val_original, lines_head,
                        time.process_time() - t_start, t_grid)
        suffix = f"_{args.tag}" if args.tag else ""
        write_report(report, RESULTS / f"vlm_tecoa_paired_{args.adapt_on}{suffix}.txt")


def render(args, path, eval_sets, others, results, grid_rows, selected, val_original, _head, cpu, t_grid) -> str:
    keys = ["clean", *[f"{e}/255" for e in EVAL_EPS]]
    sizes = ", ".join(f"{n} {len(eval_sets[n][1])}" for n in eval_sets)
    lines = [
        f"Paired zero-shot robustness transfer, tiny CLIP adapted on {args.adapt_on} (benchmarks/vlm_tecoa_paired.py)",
        environment(),
        "",
        f"Tiny CLIP: {path.name} (pretrained by benchmarks/vlm_tecoa.py on mnist, fashion_mnist, cifar10, digits).",
        (f"Adaptation: {args.adapt_on} train images 0..{args.adapt_n - 1} ({args.adapt_n}), batch 128, Adam, cosine over "
         f"{args.epochs} epochs, no weight decay, training seed {args.seed}; TeCoA: PGD 2 steps of eps (Mao et al.); FARE: PGD 10 steps."),
        (f"Grid: objective {args.objectives} x training eps {args.train_eps} (/255) x mode {args.modes} (FARE: full) x "
         f"lr {args.lrs} x epochs 1..{args.epochs} (checkpoint after each epoch of the run)."),
        (f"Selection rule (fixed before the run): per objective and training eps, the grid point with the highest "
         f"clean + robust (PGD-{args.pgd_steps} at the training eps) zero-shot accuracy on {args.val_n} held-out "
         f"{args.adapt_on} TRAIN images ({args.adapt_n}..{args.adapt_n + args.val_n - 1}), ties to the smaller lr. "
         "The evaluation sets play no part in it."),
        (f"Evaluation: zero-shot, the same random test images for every model ({sizes}); PGD-{args.pgd_steps} (CE, "
         f"1 random start, step 2.5 eps/{args.pgd_steps}, same seeds for every model) at Linf 1/255 and 4/255; only "
         "clean-correct images attacked."),
        f"CPU: grid {t_grid:.0f} s, total so far {cpu:.0f} s (process time, 1 thread).",
        "",
        "Validation grid (held-out adaptation-set images; accuracies in %):",
        "  original: " + ", ".join(f"clean {100 * c:.1f} robust@{e}/255 {100 * r:.1f}" for e, (c, r) in val_original.items()),
    ]
    for r in grid_rows:
        lines.append(f"  {r[0]:5s} eps {r[1]}/255  {r[2]:16s} lr {r[3]:<7g} ep {r[4]}   val clean {100 * r[5]:5.1f}  "
                     f"robust {100 * r[6]:5.1f}  score {100 * r[7]:6.1f}")
    lines += ["", "Selected: " + "; ".join(selected), "",
              "Zero-shot accuracy (%) on the test images:"]
    head = f"{'model':44s}" + "".join(f"{n[:13]:>22s}" for n in SETS) + f"{'MEAN of others':>22s}"
    lines += [head, f"{'':44s}" + f"{'clean  1/255  4/255':>22s}" * (len(SETS) + 1)]
    for label, res in results.items():
        cells = ""
        for n in SETS:
            cells += "".join(f"{100 * float(res[n][k].float().mean()):7.1f}" for k in keys).rjust(22)
        avg = [sum(float(res[n][k].float().mean()) for n in others) / len(others) for k in keys]
        cells += "".join(f"{100 * a:7.1f}" for a in avg).rjust(22)
        lines.append(f"{label:44s}{cells}")
    lines.append(f"  ({args.adapt_on} is the adaptation set: its column is in-domain, not zero-shot transfer.)")
    lines += ["", "Paired against the original, on the OTHER data sets (" + ", ".join(others) + "):",
              "  wins = images the adapted model gets right and the original wrong; losses = the reverse;",
              "  p = exact two-sided sign test (McNemar) on wins vs losses; diff = mean over the other sets of the",
              "  per-set accuracy difference, +- its paired standard error (95% interval ~ +-2 SE)."]
    base = results["original"]
    for label, res in results.items():
        if label == "original":
            continue
        lines.append(f"  {label}")
        for k in keys:
            parts, tw, tl, diffs, var = [], 0, 0, [], 0.0
            for n in others:
                a, b = res[n][k], base[n][k]
                w, lo, m = int((a & ~b).sum()), int((~a & b).sum()), len(a)
                tw, tl = tw + w, tl + lo
                d = (w - lo) / m
                diffs.append(d)
                var += ((w + lo) / m - d * d) / m
                parts.append(f"{n} {w}/{lo}")
            diff, se = sum(diffs) / len(others), math.sqrt(var) / len(others)
            lines.append(f"    {k:6s} wins/losses {', '.join(parts)}; pooled {tw}/{tl}, p = "
                         f"{sign_test_two_sided(tw, tl):.2g}; diff {100 * diff:+.1f} +- {100 * se:.1f} points")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
