"""What the LID detector costs, before and after its distances became one matrix product with
gradients to the query only (robustlab.defenses.detection.distances), measured side by side in one
process on the detection benchmark's models, as CPU-time ratios to the model's own forward+backward
on the same 100 images (the floor an attack pays per step anyway):

- score: the detector's score forward+backward on 100 images (what the adaptive attack pays per step
  on top of the model's);
- fit: LID vectors of 2,500 training images x 3 (clean, noisy, PGD) against the 500-image reference,
  and the regression (the PGD-10 examples of the training images are made once, outside the timing).

"before" is the same code with torch.cdist as the distance (the previous implementation). The numbers
must not move: the largest difference of the detector's scores between the two is printed.

    python benchmarks/detection_lid_cost.py [--fit-n 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, set_threads, time_interleaved, write_report  # noqa: E402

from robustlab.defenses import detection  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

SETTINGS = {"mnist": ("mnist_std", 0.3), "cifar10": ("cifar_std", 8 / 255)}
NEW = detection.distances


def cdist(f: torch.Tensor, reference: torch.Tensor, reference_sq: torch.Tensor | None = None) -> torch.Tensor:
    return torch.cdist(f, reference).clamp_min(1e-12)  # the previous distance


def measure(dataset: str, fit_n: int, repeats: int) -> str:
    key, eps = SETTINGS[dataset]
    model, _ = get_model(key)
    model.eval()
    x, y = load_split(dataset, "train")
    x, y = x[:fit_n], y[:fit_n]
    adv = torch.cat([create_attack("pgd", ThreatModel("linf", eps), steps=10).run(
        model, x[i:i + 256], y[i:i + 256], torch.Generator().manual_seed(0)).x_adv for i in range(0, len(x), 256)])
    xq = load_split(dataset, "test")[0][:100]
    fitted = {}

    def with_distance(dist, work):
        detection.distances = dist
        try:
            return work()
        finally:
            detection.distances = NEW

    def fit(name, dist):
        def go():
            fitted[name] = with_distance(dist, lambda: detection.create_detector("lid").fit(model, x, y, adv))
        return go

    def step(name, dist):
        def go():
            z = xq.clone().requires_grad_(True)
            with_distance(dist, lambda: torch.autograd.grad(fitted[name].score(model, z).sum(), z))
        return go

    def floor():
        z = xq.clone().requires_grad_(True)
        torch.autograd.grad(model(z).sum(), z)

    fits = time_interleaved({"before": fit("before", cdist), "after": fit("after", NEW)}, repeats)
    steps = time_interleaved({"floor": floor, "before": step("before", cdist), "after": step("after", NEW)},
                             max(5, repeats), warmup=True)
    with torch.no_grad():
        s_before = with_distance(cdist, lambda: fitted["before"].score(model, xq))
        s_after = fitted["after"].score(model, xq)
    diff = float((s_before - s_after).abs().max())
    f0, b, a = steps["floor"]["cpu"], steps["before"]["cpu"], steps["after"]["cpu"]
    return (f"| {dataset} ({key}) | {f0:.3f} | {b:.3f} ({b / f0:.1f}x) / {a:.3f} ({a / f0:.1f}x) | "
            f"{fits['before']['cpu']:.1f} / {fits['after']['cpu']:.1f} | {diff:.2g} (scores span "
            f"{float(s_after.min()):.2f} .. {float(s_after.max()):.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit-n", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads(1)
    lines = ["# LID detector cost: torch.cdist (before) vs one matrix product, gradient to the query only (after)",
             "", environment(), "",
             (f"Fit on train[0:{args.fit_n}] (500 reference images, the rest x clean / noisy / PGD-10); score on "
              f"100 test images; median CPU seconds of {args.repeats} interleaved repeats (score: at least 5); ratios "
              "to the model's forward+backward on the same 100 images."), "",
             ("| data set | model fwd+bwd (100) s | score fwd+bwd: before / after (x floor) | fit: before / after s | "
              "largest score difference |"), "| --- | --- | --- | --- | --- |"]
    for dataset in SETTINGS:
        lines.append(measure(dataset, args.fit_n, args.repeats))
    write_report("\n".join(lines) + "\n", RESULTS / "detection_lid_cost.txt")


if __name__ == "__main__":
    main()
