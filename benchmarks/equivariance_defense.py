"""The equivariance defense (Mao et al., "Robust perception through equivariance") on a standard MNIST
and CIFAR-10 classifier and on a segmentation U-Net: clean accuracy (mIoU), accuracy under the
non-adaptive attack its authors ran and under each adaptive attack, Linf at the usual budget and at
half of it; and its cost: CPU time as a multiple of the bare model's forward pass, and against the
forward+backward floor of the same number of passes.

    python benchmarks/equivariance_defense.py [--n 100] [--seg-n 32] [--only mnist|cifar10|seg] [--skip-cost]

Attacks (PGD, Linf, CE on the logits or the per-pixel loss, random start, ``--pgd-steps`` steps):

- non-adaptive: the authors' protocol, PGD on the undefended model, then the defense corrects the
  adversarial image (the protocol's ``transfer`` task);
- (a) unrolled: gradients through the unrolled correction (its sign steps by the straight-through
  estimate; the defense declares ``attack=unrolled``);
- (b) BPDA: the correction in the forward pass, the identity in the backward pass (``attack=bpda``);
- (c) BPDA + EOT: (b) with the gradient averaged over ``--eot`` draws of the correction's random
  transformations, initialisation and noise;
- (d) BPDA + the equivariance loss: (b) on the loss ``CE - w * equivariance_loss(x_adv)``, so the
  defense finds little to correct (``adaptive_weight=w``; an adaptive task of the adversarial
  protocol, run by any gradient attack through ``model_objective``).

Every attack is paired with the defense by the evaluation's own rule (``adaptive_attacks`` on the
defended model's declarations), and every adversarial image is judged by the defended model's
prediction (a fresh correction). "worst case" counts a point robust only if no attack broke it.

Defense settings: the cost section runs the paper's defaults (20 steps x (8 views + identity) = 180
forward-backward passes per image, budget 1.5 x eps); the accuracy tables run ``--steps`` x
``--views`` (default 10 x 4 = 50 passes: the shared 2-core machine cannot afford 180 per attack step)
with the paper's other defaults. Models: benchmarks/common.py's ``mnist_std`` and ``cifar_std``; the
segmentation model is robustlab's ``seg_unet`` (width 8, depth 2) trained here on 2,000 scenes of real
MNIST digits (``scenes-mnist`` at 32x32; Adam, 8 epochs, seeded), or with ``--seg-model scenes_seg`` the
benchmarks' cached ``scenes_seg`` (width 16, depth 3, 64x64 scenes) at Linf 0.3 and 0.15.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    environment,
    get_model,
    load_split,
    log,
    set_threads,
    shared_data_dir,
    time_interleaved,
    write_report,
)

from robustlab.attacks import create_attack
from robustlab.defenses import apply_defenses
from robustlab.defenses.equivariance_views import apply_views, draw_views
from robustlab.eval.metrics import SegmentationScore, confusion_counts
from robustlab.eval.runner import adaptive_attacks
from robustlab.threat import ThreatModel

CLASSIFIERS = {"mnist": ("mnist_std", 0.3), "cifar10": ("cifar_std", 8 / 255)}
SEG_EPS = 0.1  # scenes of MNIST digits: Linf 0.1 (grey backgrounds and textures make 0.3 meaningless)


def variants(eot: int) -> list[tuple[str, str | None]]:
    return [
        ("non-adaptive (PGD on the undefended model)", None),
        ("(a) unrolled", "attack=unrolled,eot=1"),
        ("(b) BPDA", "eot=1"),
        (f"(c) BPDA + EOT x{eot}", f"eot={eot}"),
        ("(d) BPDA + equivariance loss (w=1)", "eot=1,adaptive_weight=1"),
    ]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- cost


def cost_section(name: str, model, x: torch.Tensor, eps: float, repeats: int) -> list[str]:
    """CPU time of one correction of ``x`` at the paper's defaults, against the bare forward pass and
    against the floor: the same number of forward+backward passes of the whole model, batched the
    same way (one batch of images x views per step), on the same kind of inputs (views of perturbed
    images), without the defense's own work (drawing and applying views, the loss, the steps)."""
    dm = apply_defenses(model, [f"equivariance:eps={eps}"])
    d = dm.defenses[0]
    steps, k = int(d.params["steps"]), int(d.params["views"])
    g = gen(0)
    points = []
    for _ in range(steps):
        xc = (x + (2 * torch.rand(x.shape, generator=g) - 1) * d.budget).clamp(0, 1)
        points.append(torch.cat([xc, apply_views(xc, draw_views(x.shape[0], k, d.settings, g, x.device, x.dtype))]))

    def floor() -> None:
        for b in points:
            b = b.detach().requires_grad_(True)
            torch.autograd.grad(model(b).logsumexp(dim=1).sum(), b)

    def defense() -> None:
        d.transform(x, gen(1))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    t = time_interleaved({"floor": floor, "defense": defense, "forward": forward}, repeats=repeats, warmup=True)
    cpu = {key: v["cpu_min"] for key, v in t.items()}
    return [
        (f"| {name} | {x.shape[0]} | {d.layer_name} | {d.passes_per_image} | {cpu['forward']:.3f} | {cpu['floor']:.2f} | "
        f"{cpu['defense']:.2f} | {cpu['defense'] / cpu['floor']:.3f} | {cpu['defense'] / cpu['forward']:.0f}x |")
    ]


# ---------------------------------------------------------------------- attacks


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def defended_predict(dm, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The defended model's output labels (N,) or (N, H, W): a fresh correction, then the argmax."""
    with torch.no_grad():
        return dm.model(dm.defenses[0].transform(x, gen(seed))).argmax(dim=1)


def run_attack(model, spec: str, defense: str | None, attack, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Adversarial images: ``attack`` on the undefended model (defense None) or made adaptive to the
    defended model ``spec,defense`` by the evaluation's rule, in chunks (the unrolled view keeps the
    graph of the whole correction)."""
    out = torch.empty_like(x)
    target = model
    if defense is not None:
        target = apply_defenses(model, [f"{spec},{defense}"])
        attack = adaptive_attacks([attack], target.needs())[0]
    for i, s in enumerate(chunks(x.shape[0], chunk)):
        if defense is not None:
            target.set_generator(gen(1000 + i))
        out[s] = attack.run(target, x[s], y[s], gen(2000 + i)).x_adv
    return out


def classifier_rows(dataset: str, n: int, args) -> list[str]:
    key, eps_full = CLASSIFIERS[dataset]
    model, _ = get_model(key)
    x, y = load_split(dataset, "test")
    x, y = x[:n].contiguous(), y[:n].contiguous()
    rows = []
    for eps in (eps_full, eps_full / 2):
        t0 = time.process_time()
        spec = f"equivariance:eps={eps},steps={args.steps},views={args.views}"
        dm = apply_defenses(model, [spec])
        threat = ThreatModel("linf", eps)
        pgd = create_attack("pgd", threat, steps=args.pgd_steps)
        with torch.no_grad():
            bare_ok = model(x).argmax(dim=1) == y
        bare_adv = run_attack(model, spec, None, pgd, x, y, args.chunk)
        with torch.no_grad():
            bare_robust = bare_ok & (model(bare_adv).argmax(dim=1) == y)
        ok = torch.cat([defended_predict(dm, x[s], 10 + i) for i, s in enumerate(chunks(n, args.chunk))]) == y
        idx = ok.nonzero(as_tuple=True)[0]
        cells, worst = [], ok.clone()
        for label, defense in variants(args.eot):
            a0 = time.process_time()
            robust = torch.zeros(n, dtype=torch.bool)
            if idx.numel():
                if defense is None:
                    x_adv = bare_adv[idx]
                else:
                    x_adv = run_attack(model, spec, defense, pgd, x[idx], y[idx], args.chunk)
                pred = torch.cat([defended_predict(dm, x_adv[s], 20 + i) for i, s in enumerate(chunks(idx.numel(), args.chunk))])
                robust[idx] = pred == y[idx]
            worst &= robust
            cells.append(f"{100 * robust.float().mean():5.1f}%")
            log(f"[{dataset} eps {eps:.4g}] {label}: {100 * robust.float().mean():.1f}% ({time.process_time() - a0:.0f} s CPU)")
        rows.append(f"| {dataset} ({key}) | {eps:.4g} | {100 * bare_ok.float().mean():5.1f}% | "
                    f"{100 * bare_robust.float().mean():5.1f}% | {100 * ok.float().mean():5.1f}% | " + " | ".join(cells)
                    + f" | {100 * worst.float().mean():5.1f}% | {time.process_time() - t0:.0f} |")
    return rows


# ---------------------------------------------------------------------- segmentation


def segmentation_model(train_n: int):
    from robustlab.data import load_dataset
    from robustlab.models import create_model
    from robustlab.training import TrainConfig, train

    data = load_dataset("scenes-mnist", "train", root=shared_data_dir(), image_size=32)
    data = data.subset(train_n)
    torch.manual_seed(0)
    model = create_model("seg_unet", num_classes=11, width=8, depth=2)
    c0 = time.process_time()
    train(model, data, TrainConfig(epochs=8, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0, seed=0),
          progress=False)
    log(f"[seg] U-Net trained on {train_n} scenes in {time.process_time() - c0:.0f} s CPU")
    return model.eval()


def miou(pred: torch.Tensor, y: torch.Tensor, classes: int = 11) -> float:
    correct, inter, union = confusion_counts(pred, y, classes)
    score = SegmentationScore(classes).update("v", [y[0].numel()] * y.shape[0], correct, inter, union)
    return score.compute()["v"]["mean_iou"]


def segmentation_rows(n: int, args) -> list[str]:
    from robustlab.data import load_dataset

    if args.seg_model == "scenes_seg":  # the benchmarks' cached 64x64 U-Net at MNIST's budget
        model, _ = get_model("scenes_seg")
        model.eval()
        test = load_dataset("scenes-mnist", "test", root=shared_data_dir()).subset(n)
        name, seg_eps = "scenes-mnist 64x64 (scenes_seg)", 0.3
    else:
        model = segmentation_model(args.seg_train)
        test = load_dataset("scenes-mnist", "test", root=shared_data_dir(), image_size=32).subset(n)
        name, seg_eps = "scenes-mnist 32x32 (seg_unet)", SEG_EPS
    x, y = test.batch(range(n))
    rows = []
    for eps in (seg_eps, seg_eps / 2):
        t0 = time.process_time()
        spec = f"equivariance:eps={eps},steps={args.steps},views={args.views}"
        dm = apply_defenses(model, [spec])
        pgd = create_attack("pgd", ThreatModel("linf", eps), steps=args.pgd_steps)
        with torch.no_grad():
            bare = model(x).argmax(dim=1)
        bare_adv = run_attack(model, spec, None, pgd, x, y, args.chunk)
        with torch.no_grad():
            bare_robust = model(bare_adv).argmax(dim=1)
        clean = torch.cat([defended_predict(dm, x[s], 10 + i) for i, s in enumerate(chunks(n, args.chunk))])
        cells, worst_pred = [], clean.clone()
        for label, defense in variants(args.eot):
            a0 = time.process_time()
            x_adv = bare_adv if defense is None else run_attack(model, spec, defense, pgd, x, y, args.chunk)
            pred = torch.cat([defended_predict(dm, x_adv[s], 20 + i) for i, s in enumerate(chunks(n, args.chunk))])
            worst_pred = torch.where(pred != y, pred, worst_pred)  # a pixel any attack got wrong stays wrong
            cells.append(f"{miou(pred, y):.3f}")
            log(f"[seg eps {eps:.4g}] {label}: mIoU {miou(pred, y):.3f} ({time.process_time() - a0:.0f} s CPU)")
        rows.append(f"| {name} | {eps:.4g} | {miou(bare, y):.3f} | {miou(bare_robust, y):.3f} | "
                    f"{miou(clean, y):.3f} | " + " | ".join(cells) + f" | {miou(worst_pred, y):.3f} | "
                    f"{time.process_time() - t0:.0f} |")
    return rows


# ---------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="test images per classifier")
    ap.add_argument("--seg-n", type=int, default=32, help="test scenes for the segmentation rows")
    ap.add_argument("--seg-train", type=int, default=2000, help="training scenes for the U-Net")
    ap.add_argument("--seg-model", choices=["train", "scenes_seg"], default="train",
                    help="segmentation model: a 32x32 U-Net trained here (eps 0.1, 0.05) or the cached scenes_seg "
                         "(64x64, eps 0.3, 0.15)")
    ap.add_argument("--cost-n", type=int, default=32, help="images in the cost measurement")
    ap.add_argument("--steps", type=int, default=10, help="defense steps in the accuracy tables")
    ap.add_argument("--views", type=int, default=4, help="defense views per step in the accuracy tables")
    ap.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of every attack")
    ap.add_argument("--eot", type=int, default=4, help="EOT draws of attack (c)")
    ap.add_argument("--chunk", type=int, default=25, help="images per attack batch")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (fastest counts)")
    ap.add_argument("--only", choices=["mnist", "cifar10", "seg"], help="one part only")
    ap.add_argument("--skip-cost", action="store_true", help="no cost section")
    ap.add_argument("--out", default=str(RESULTS / "equivariance_defense.txt"), help="report file")
    args = ap.parse_args()
    set_threads(1)
    parts = [args.only] if args.only else ["mnist", "cifar10", "seg"]
    lines = ["# Equivariance defense (Mao et al.): non-adaptive vs adaptive attacks, and its cost", "",
             environment(), ""]
    if not args.skip_cost:
        lines += [("## Cost of one correction at the paper's defaults (20 steps x (8 views + identity), CPU seconds, "
                  "fastest of interleaved repeats)"), "",
                  ("floor: the same number of forward+backward passes of the whole model, batched as the defense "
                  "batches them (images x views per step), on views of perturbed images; ratio: defense / floor "
                  "(the defense stops the forward pass at its feature layer, so it can be below 1)."), "",
                  ("| model | images | feature layer | passes per image | bare forward | floor | defense | "
                  "defense / floor | defense / bare forward |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for part in parts:
            if part == "seg":
                continue
            key, eps = CLASSIFIERS[part]
            model, _ = get_model(key)
            x, _ = load_split(part, "test")
            lines += cost_section(key, model, x[: args.cost_n].contiguous(), eps, args.repeats)
        lines.append("")
    lines += [(f"## Accuracy: first {args.n} test images per classifier, {args.seg_n} test scenes; defense "
              f"{args.steps} steps x {args.views} views (+ identity), budget 1.5 x eps; PGD {args.pgd_steps} steps, "
              f"EOT x{args.eot} for (c)"), "",
              ("Classifiers: accuracy; segmentation: mIoU over the test scenes (11 classes, background included). "
              "'undefended PGD' attacks the bare model; the defended columns judge each adversarial image by a "
              "fresh correction."), "",
              "| model | eps | undefended clean | undefended PGD | defended clean | "
              + " | ".join(label for label, _ in variants(args.eot)) + " | worst case | CPU s |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in variants(args.eot)) + " | --- | --- |"]
    for part in parts:
        if part == "seg":
            lines += segmentation_rows(args.seg_n, args)
        else:
            lines += classifier_rows(part, args.n, args)
    lines.append("")
    write_report("\n".join(lines) + "\n", Path(args.out))


if __name__ == "__main__":
    main()
