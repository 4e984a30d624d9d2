"""Segmentation on MNIST scenes: a small U-Net, clean and under attacks on the per-pixel loss.

What is measured, on one run:

- The model: ``seg_unet`` (width 16, 3 poolings, 11 classes: background + 10 digits) trained with the
  standard recipe through robustlab's training loop on the first 3,000 scenes of ``scenes-mnist``
  train (64x64, 2-4 MNIST train digits of 20-36 pixels on plain / noise / texture backgrounds;
  ``robustlab.data.scenes``), 6 epochs of Adam (sizes for 2 shared CPU cores); cached as ``benchmarks/.cache/scenes_seg.safetensors``
  (``benchmarks/common.py``'s ``get_model("scenes_seg")``) for the equivariance defense to reuse.
- mIoU and pixel accuracy on the first ``--n`` scenes of ``scenes-mnist`` test (made from MNIST test
  digits), clean and under robustlab's PGD and APGD-CE on the per-pixel cross-entropy averaged over
  all pixels, Linf eps 0.3 (MNIST's usual budget) and 0.15 (half), each through the segmentation
  protocol (``robustlab.eval.protocols.SegmentationProtocol``: every adversarial image re-checked in
  the ball and [0, 1]).
- Peer check: torchattacks' PGD, whose CrossEntropyLoss on (N, C, H, W) logits and (N, H, W) labels is
  the per-pixel loss averaged over batch and pixels (its sign steps equal robustlab's, which averages
  per sample: a positive rescaling), same eps, steps, step size and random start in the ball (not the
  same draws); its images are scored by the same metric. The two mIoU should agree within the noise of
  the random starts; the CPU time of both is given as a ratio (process time, one thread, same process).

Usage: nice python benchmarks/segmentation_scenes.py [--n 100] [--steps 20] [--threads 1]
(torchattacks is in the dev extra: pip install torchattacks). The report is printed and written to
benchmarks/results/segmentation_scenes.txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    environment,
    get_model,
    log,
    set_threads,
    shared_data_dir,
    write_report,
)

EPS = (0.3, 0.15)


def protocol_run(model, data, attacks, db: Path) -> tuple[dict, float]:
    """The segmentation protocol's summary for ``attacks`` on ``data``, and its CPU seconds."""
    from robustlab.eval.protocols import SegmentationProtocol
    from robustlab.eval.runner import run
    from robustlab.eval.store import ResultsStore

    t0 = time.process_time()
    with ResultsStore(db) as store:
        result = run(model, data, SegmentationProtocol(attacks, data.num_classes, classes=list(data.classes)), store,
                     batch_size=50, progress=False)
    return result.summary, time.process_time() - t0


def torchattacks_pgd(model, data, eps: float, steps: int, alpha: float) -> tuple[dict, float]:
    """mIoU and pixel accuracy of torchattacks' PGD images (the same metric), and its CPU seconds."""
    import torchattacks

    from robustlab.eval.metrics import SegmentationScore, confusion_counts

    torch.manual_seed(0)
    attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    metric = SegmentationScore(data.num_classes)
    seconds = 0.0
    for _, _, x, y in data.batches(50):
        t0 = time.process_time()
        x_adv = attack(x, y)
        seconds += time.process_time() - t0
        assert float((x_adv - x).abs().max()) <= eps + 1e-6 and 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
        with torch.no_grad():
            pred = model(x_adv).argmax(dim=1)
        c, i, u = confusion_counts(pred, y, data.num_classes)
        metric.update("adversarial", [y[0].numel()] * len(c), c, i, u)
    return metric.compute()["adversarial"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="test scenes to evaluate (the first N of scenes-mnist test)")
    parser.add_argument("--steps", type=int, default=20, help="iterations of every attack")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    set_threads(args.threads)

    from robustlab.attacks import create_attack
    from robustlab.data import load_dataset
    from robustlab.threat import ThreatModel

    model, card = get_model("scenes_seg")
    data = load_dataset("scenes_mnist", "test", root=shared_data_dir()).subset(args.n)
    recipe = card["training"]["recipe"]
    background = float((data.y == 0).float().mean())
    lines = [
        "Segmentation on MNIST scenes: seg_unet clean and under attacks on the per-pixel loss",
        f"environment: {environment()}",
        (f"model: seg_unet {recipe['arch_kwargs']}, standard training, {recipe['train_subset']} scenes of scenes-mnist "
        f"train, {recipe['epochs']} epochs Adam lr {recipe['lr']} (trained in {card['training']['seconds']:.0f} s; "
        f"cached as benchmarks/.cache/scenes_seg.safetensors)"),
        (f"test: the first {len(data)} scenes of scenes-mnist test (64x64, 2-4 MNIST test digits, 11 classes); "
        f"background is {100 * background:.1f}% of the pixels (predicting it everywhere: mIoU {100 * background / 11:.2f}%)"),
        (f"attacks: {args.steps} steps, random start, loss = per-pixel cross-entropy averaged over all pixels; "
        "PGD step 2.5 eps / steps; robust numbers per sample from the attack image"),
        "",
        f"{'setting':34s} {'mIoU':>8s} {'pixel acc':>10s} {'CPU s':>8s}",
    ]
    tmp = Path(tempfile.mkdtemp())
    clean = None
    table: dict[tuple[str, float], dict] = {}
    for eps in EPS:
        threat = ThreatModel("linf", eps)
        settings = {"robustlab pgd": [create_attack("pgd", threat, steps=args.steps)],
                    "robustlab apgd-ce": [create_attack("apgd-ce", threat, steps=args.steps)]}
        for name, attacks in settings.items():
            log(f"{name} at eps {eps} ...")
            summary, seconds = protocol_run(model, data, attacks, tmp / f"{name.replace(' ', '_')}_{eps}.db")
            if clean is None:
                clean = summary
                lines.append(f"{'clean':34s} {100 * summary['clean_miou']:7.2f}% {100 * summary['clean_pixel_accuracy']:9.2f}%")
            table[(name, eps)] = {"mean_iou": summary["robust_miou"], "pixel_accuracy": summary["robust_pixel_accuracy"],
                                  "seconds": seconds}
        log(f"torchattacks pgd at eps {eps} ...")
        ta, seconds = torchattacks_pgd(model, data, eps, args.steps, 2.5 * eps / args.steps)
        table[("torchattacks pgd", eps)] = {**ta, "seconds": seconds}
        for name in [*settings, "torchattacks pgd"]:
            row = table[(name, eps)]
            lines.append(f"{f'{name} eps={eps:g}':34s} {100 * row['mean_iou']:7.2f}% {100 * row['pixel_accuracy']:9.2f}% "
                         f"{row['seconds']:8.1f}")
    lines.append("")
    lines.append("per-class IoU, clean: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in zip(clean["classes"], clean["clean_iou"])
                                                    if v is not None))
    lines.append("peer check (robustlab PGD vs torchattacks PGD on the same model and scenes, different random starts):")
    for eps in EPS:
        ours, theirs = table[("robustlab pgd", eps)], table[("torchattacks pgd", eps)]
        # robustlab's protocol time includes its clean pass and re-checks; the attack is nearly all of it
        lines.append(f"  eps={eps:g}: mIoU {100 * ours['mean_iou']:.2f}% vs {100 * theirs['mean_iou']:.2f}% "
                     f"(difference {100 * (ours['mean_iou'] - theirs['mean_iou']):+.2f} points), pixel accuracy "
                     f"{100 * ours['pixel_accuracy']:.2f}% vs {100 * theirs['pixel_accuracy']:.2f}%; CPU time "
                     f"{ours['seconds'] / theirs['seconds']:.2f}x torchattacks' (robustlab's includes the protocol's "
                     "clean pass and checks)")
    write_report("\n".join(lines) + "\n", RESULTS / "segmentation_scenes.txt")


if __name__ == "__main__":
    main()
