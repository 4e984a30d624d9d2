"""The Neural Representation Purifier (NRP, Naseer et al. 2020) in front of a segmentation model: the
benchmarks' ``scenes_seg`` U-Net (seg_unet width 16, depth 3, 11 per-pixel classes) on MNIST scenes.

The defender trains a purifier label-free (robustlab.training.purifier, the default residual
purifier, feature + pixel losses) on the first ``--train-n`` scenes of scenes-mnist train for
``--epochs`` epochs, with SSP perturbations (Linf 0.3, ``--ssp-steps`` steps) against a layer of the
protected model itself: ``net.down.3``, the U-Net's bottleneck (128 channels at 8x8; the deepest,
most semantic map; the default rule would take the last decoder block at full resolution). Then, on
the first ``--n`` scenes of scenes-mnist test, mIoU (11 classes, background included) and pixel
accuracy at Linf eps 0.3 (MNIST's usual budget) and 0.15:

- clean: undefended, NRP, dynamic NRP (Gaussian noise sigma 0.2 clipped to the training eps 0.3 before
  the purifier; per-pixel majority vote over ``--draws`` draws);
- non-adaptive (black-box transfer): PGD on the per-pixel loss crafted on the undefended model
  (scenes_seg itself: the attacker knows the segmenter but not that a purifier sits in front -- no
  separately trained surrogate, a CPU budget), all steps, then judged on the three pipelines;
- adaptive (white-box): PGD through the purifier (the segmentation protocol's adaptive attack on a
  DefendedModel: gradients through the purifier network), and on dynamic NRP with EOT over
  ``--draws`` noise draws per step (the protocol's adaptive attack adds the EOT).

Every protocol row is a runner.segment run (attack images re-checked in the ball and [0, 1]); the
transfer rows score the crafted images with the same metric (SegmentationScore).

    nice python benchmarks/nrp_segmentation.py [--n 50] [--steps 10] [--train-n 2000] [--epochs 2]

Writes benchmarks/results/nrp_segmentation.txt (a partial file after each epsilon). The purifier is
cached as benchmarks/.cache/nrp_scenes_seg.safetensors.
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
    CACHE,
    RESULTS,
    environment,
    get_model,
    log,
    set_threads,
    shared_data_dir,
    write_report,
)

LAYER = "net.down.3"
TRAIN_EPS = 0.3
SIGMA = 0.2
EPS = (0.3, 0.15)


def purifier_for(model, train_n: int, epochs: int, ssp_steps: int, train_eps: float) -> tuple[Path, dict]:
    """The defender's purifier (cached when its recipe matches), its path and card training record."""
    from robustlab.data import load_dataset
    from robustlab.models.purifier import load_purifier, save_purifier
    from robustlab.training import TrainConfig
    from robustlab.training.purifier import PurifierConfig, train_purifier

    path = CACHE / ("nrp_scenes_seg.safetensors" if train_eps == TRAIN_EPS else f"nrp_scenes_seg_{train_eps:g}.safetensors")
    recipe = {"dataset": "scenes_mnist", "train_n": train_n, "epochs": epochs, "ssp_steps": ssp_steps,
              "layer": LAYER, "eps": train_eps}
    if path.is_file():
        _, card = load_purifier(path)
        if card.training.get("bench_recipe") == recipe:
            return path, card.training
    data = load_dataset("scenes_mnist", "train", root=shared_data_dir()).subset(train_n)
    config = PurifierConfig(eps=train_eps, steps=ssp_steps, layer=LAYER, train=TrainConfig(
        epochs=epochs, batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="cosine", seed=0))
    log(f"training a purifier on {train_n} scenes, {epochs} epoch(s), against scenes_seg {LAYER} ...")
    c0 = time.process_time()
    run = train_purifier(data, model, "scenes_seg", config, progress=False, on_epoch=lambda r: log(f"  {r}"))
    record = {**run.record, "bench_recipe": recipe, "cpu_seconds": round(time.process_time() - c0, 1)}
    save_purifier(run.purifier, path, "residual", {}, (64, 64), record, dataset="scenes_mnist:train")
    return path, record


def protocol(model, data, attack, db: Path) -> dict:
    """runner.segment's summary (a DefendedModel is attacked adaptively)."""
    from robustlab.eval.runner import segment
    from robustlab.eval.store import ResultsStore

    with ResultsStore(db) as store:
        return segment(model, data, [attack], store, batch_size=25, progress=False).summary


def score(pipeline, data, x_adv: torch.Tensor) -> dict:
    """mIoU and pixel accuracy of ``pipeline``'s predictions (a vote for dynamic NRP, seeded) on ``x_adv``."""
    from robustlab.eval.metrics import SegmentationScore, confusion_counts
    from robustlab.predictor import predict

    metric = SegmentationScore(data.num_classes)
    for k, (_, _, x, y) in enumerate(data.batches(25)):
        with torch.no_grad():
            pred = predict(pipeline.eval(), x_adv[k * 25:k * 25 + len(y)], torch.Generator().manual_seed(7 + k), dense=True)
        c, i, u = confusion_counts(pred, y, data.num_classes)
        metric.update("adversarial", [y[0].numel()] * len(c), c, i, u)
    return metric.compute()["adversarial"]


def craft_transfer(model, data, attack) -> torch.Tensor:
    """PGD images crafted on the undefended model, every step run (no early stop: they are judged elsewhere)."""
    attack.is_success = lambda logits, y: torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    out = []
    for k, (_, _, x, y) in enumerate(data.batches(25)):
        out.append(attack.run(model, x, y, torch.Generator().manual_seed(100 + k)).x_adv)
    return torch.cat(out)


def pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:5.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="test scenes (the first N of scenes-mnist test)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps of every attack")
    ap.add_argument("--draws", type=int, default=4, help="dynamic NRP: votes per prediction and EOT draws per step")
    ap.add_argument("--train-n", type=int, default=2000, help="training scenes of the purifier")
    ap.add_argument("--epochs", type=int, default=2, help="purifier training epochs")
    ap.add_argument("--ssp-steps", type=int, default=3, help="SSP steps per purifier training batch")
    ap.add_argument("--train-eps", type=float, default=TRAIN_EPS, help="SSP Linf budget of purifier training")
    ap.add_argument("--out", default=str(RESULTS / "nrp_segmentation.txt"), help="report file")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    set_threads(args.threads)

    from robustlab.attacks import create_attack
    from robustlab.data import load_dataset
    from robustlab.defenses import apply_defenses
    from robustlab.threat import ThreatModel

    model, card = get_model("scenes_seg")
    model.eval()
    p_def, rec = purifier_for(model, args.train_n, args.epochs, args.ssp_steps, args.train_eps)
    data = load_dataset("scenes_mnist", "test", root=shared_data_dir()).subset(args.n)
    nrp = apply_defenses(model, [f"nrp:purifier={p_def}"])
    dynamic = apply_defenses(model, [f"nrp:purifier={p_def},dynamic=true,sigma={SIGMA},draws={args.draws}"])
    pipelines = {"undefended": model, "NRP": nrp, "dynamic NRP": dynamic}
    tmp = Path(tempfile.mkdtemp())

    final = rec.get("final", {})
    head = [
        "NRP on segmentation: scenes_seg (seg_unet width 16 depth 3, 11 classes) behind a label-free purifier",
        f"environment: {environment()}",
        (f"model: benchmarks/.cache/scenes_seg (standard training, {card['training']['recipe']['train_subset']} scenes; "
         f"clean mIoU {100 * card.get('clean_miou', float('nan')):.1f}% where recorded)" if "clean_miou" in card else
         "model: benchmarks/.cache/scenes_seg (standard training on 3,000 scenes of scenes-mnist train)"),
        (f"purifier: residual (default), label-free on the first {args.train_n} scenes of scenes-mnist train, "
         f"{args.epochs} epoch(s) (batch 32, Adam 1e-3, cosine), SSP Linf {args.train_eps:g} {args.ssp_steps} steps against "
         f"scenes_seg layer {rec['layer']} (the protected model's own bottleneck); final relative feature loss "
         f"{final.get('train_feature_loss', float('nan')):.3f} (unpurified SSP images "
         f"{final.get('train_feature_loss_unpurified', float('nan')):.3f}), pixel loss "
         f"{final.get('train_pixel_loss', float('nan')):.4f}; {rec.get('cpu_seconds', float('nan'))} CPU s"),
        (f"test: the first {len(data)} scenes of scenes-mnist test; attacks: PGD-{args.steps} on the per-pixel "
         f"cross-entropy, random start, step 2.5 eps/steps; dynamic NRP: noise sigma {SIGMA} clipped to {args.train_eps:g}, "
         f"vote over {args.draws} draws per pixel, EOT over {args.draws} draws per step"),
        ("non-adaptive = transfer: PGD crafted on the undefended scenes_seg (no separate surrogate), all steps, then "
         "judged on each pipeline; adaptive = runner.segment on the DefendedModel (gradients through the purifier; "
         "EOT for dynamic NRP)"),
        "",
    ]
    table = ["| eps | attack | judged on | mIoU | pixel acc |", "| --- | --- | --- | --- | --- |"]

    def flush(done: float | None) -> None:
        note = [] if done is None else [f"(partial: finished up to eps {done:g})", ""]
        write_report("\n".join([*head, *note, *table, ""]) + "\n", Path(args.out))

    log("clean ...")
    for name, pipe in pipelines.items():
        s = score(pipe, data, data.x)
        table.append(f"| 0 | none (clean) | {name} | {pct(s['mean_iou'])} | {pct(s['pixel_accuracy'])} |")
    for eps in EPS:
        threat = ThreatModel("linf", eps)
        pgd = create_attack("pgd", threat, steps=args.steps)
        log(f"eps {eps}: transfer ...")
        adv = craft_transfer(model, data, create_attack("pgd", threat, steps=args.steps))
        assert threat.contains(adv, data.x, tol=1e-6).all()
        for name, pipe in pipelines.items():
            s = score(pipe, data, adv)
            table.append(f"| {eps:g} | transfer: PGD-{args.steps} on the undefended model | {name} | "
                         f"{pct(s['mean_iou'])} | {pct(s['pixel_accuracy'])} |")
        flush(eps)
        log(f"eps {eps}: white-box through the purifier ...")
        s = protocol(nrp, data, pgd, tmp / f"nrp_{eps}.db")
        table.append(f"| {eps:g} | adaptive: PGD-{args.steps} through the purifier (runner.segment) | NRP | "
                     f"{pct(s['robust_miou'])} | {pct(s['robust_pixel_accuracy'])} |")
        flush(eps)
        log(f"eps {eps}: dynamic NRP with EOT ...")
        s = protocol(dynamic, data, pgd, tmp / f"dyn_{eps}.db")
        table.append(f"| {eps:g} | adaptive: PGD-{args.steps} through noise + purifier, EOT {args.draws} "
                     f"(runner.segment) | dynamic NRP | {pct(s['robust_miou'])} | {pct(s['robust_pixel_accuracy'])} |")
        flush(eps)
    flush(None)


if __name__ == "__main__":
    main()
