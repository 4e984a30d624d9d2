"""Issue 20, defect 3: what SSP does, on its own model and transferred to another one.

Source model: the issue-20 LeNet (benchmarks/lenet_mnist.py, all 60,000 training images, seed 0).
Target model: the same architecture trained with another seed on the first 20,000 training images.
Data: the first N MNIST test images. Threat: Linf eps 0.1 (the issue's), and 0.2.

Printed per attack: the fraction of predictions changed on the source (white-box) and on the target
(the source's examples moved over unchanged), for SSP at the model output (the release's default
layer) and at a mid-level layer (the second conv block's ReLU), PGD (20 steps, CE on the source's
own predictions: label-based), and random sign noise of the same Linf norm (the floor any attack
should beat). Labels are the source's clean predictions (the perturb command's setting).

Usage: python benchmarks/ssp_transfer.py [--n 200] [--threads 1]
Writes benchmarks/results/ssp_transfer.txt.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, load_split, set_threads, write_report  # noqa: E402
from benchmarks.lenet_mnist import get_lenet  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def changed(model, x, x_adv):
    with torch.no_grad():
        return (model(x_adv).argmax(1) != model(x).argmax(1)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    source, target = get_lenet(), get_lenet(seed=1, subset=20000)
    x = load_split("mnist", "test")[0][: args.n]
    with torch.no_grad():
        labels = source(x).argmax(1)
    lines = [f"SSP transfer on MNIST: source = issue-20 LeNet, target = same architecture, other seed, 20k images; "
             f"first {args.n} test images; {environment()}", "",
             f"{'attack':<34} {'eps':>5} {'source changed':>15} {'target changed':>15}"]
    for eps in (0.1, 0.2):
        threat = ThreatModel("linf", eps)
        contenders = {
            "ssp (layer = output, the default)": create_attack("ssp", threat),
            "ssp (layer = 4, mid-level ReLU)": create_attack("ssp", threat, layer="4"),
            "pgd (20 steps, CE)": create_attack("pgd", threat, steps=20),
        }
        for name, attack in contenders.items():
            x_adv = attack.run(source, x, labels, torch.Generator().manual_seed(0)).x_adv
            lines.append(f"{name:<34} {eps:>5} {100 * changed(source, x, x_adv):>14.1f}% "
                         f"{100 * changed(target, x, x_adv):>14.1f}%")
        gen = torch.Generator().manual_seed(0)
        noise = (x + eps * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)).clamp(0, 1)
        lines.append(f"{'random sign noise':<34} {eps:>5} {100 * changed(source, x, noise):>14.1f}% "
                     f"{100 * changed(target, x, noise):>14.1f}%")
    write_report("\n".join(lines) + "\n", RESULTS / "ssp_transfer.txt")


if __name__ == "__main__":
    main()
