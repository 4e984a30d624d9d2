"""APGD-CE in L1 (Croce & Hein 2021, the sparse "mind the box" steps) against ART's
AutoProjectedGradientDescent with norm=1, on the issue-20 LeNet (MNIST).

Data: the correctly classified ones among the first N MNIST test images; L1 eps as given (default
8: a few strokes' worth on MNIST). Both 100 iterations, one random start, cross-entropy. Robust
accuracy counts a point broken only if the returned image is misclassified by a fresh forward pass,
lies in the box and within eps (tolerance 1e-4). Time: process CPU seconds; robustlab's also over its
forward+backward floor (100 forward and backward passes at points in the L1 ball, same batch, same
run). Claim: robustlab's robust accuracy at most 0.5 points above ART's; time within 1.15x of the floor.

Usage: python benchmarks/apgd_l1_vs_peers.py [--n 100] [--eps 8] [--threads 1]
Writes benchmarks/results/apgd_l1_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, set_threads, write_report  # noqa: E402
from benchmarks.lenet_mnist import correct_test_images, get_lenet  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def robust(model, x, y, x_adv, threat):
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    inside = threat.contains(x_adv, x, tol=1e-4)
    return 100 * (1 - (wrong & inside).float().mean().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = get_lenet()
    x, y = correct_test_images(model, args.n)
    threat = ThreatModel("l1", args.eps)
    t = time.process_time()
    r = create_attack("apgd-ce", threat, steps=100).run(model, x, y, torch.Generator().manual_seed(0))
    t_rl = time.process_time() - t
    ra_rl = robust(model, x, y, r.x_adv, threat)
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    t = time.process_time()
    art = AutoProjectedGradientDescent(clf, norm=1, eps=args.eps, eps_step=args.eps, max_iter=100, targeted=False,
                                       nb_random_init=1, batch_size=len(y), loss_type="cross_entropy", verbose=False)
    x_art = torch.from_numpy(art.generate(x.numpy(), y=y.numpy()))
    t_art = time.process_time() - t
    ra_art = robust(model, x, y, x_art, threat)
    gen = torch.Generator().manual_seed(1)
    pts = [threat.random_init(x, gen, radius="uniform") for _ in range(100)]
    t = time.process_time()
    for p in pts:
        xr = p.requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    t_floor = time.process_time() - t
    lines = [
        f"APGD-CE L1 vs ART AutoProjectedGradientDescent(norm=1) on the issue-20 LeNet (MNIST): {len(y)} correctly "
        f"classified of the first {args.n} test images, eps {args.eps:g}, 100 iterations; {environment()}", "",
        f"robust accuracy: robustlab {ra_rl:.1f}%  ART {ra_art:.1f}%",
        f"CPU s: robustlab {t_rl:.2f} (it stops broken points early), ART {t_art:.2f}; floor (100 fwd+bwd on all "
        f"points) {t_floor:.2f}; robustlab/floor {t_rl / t_floor:.2f}",
        "",
        f"{'PASS' if ra_rl <= ra_art + 0.5 else 'FAIL'}  robust accuracy within 0.5 points of ART's",
        f"{'PASS' if t_rl <= 1.15 * t_floor else 'FAIL'}  time within 1.15x of the floor",
    ]
    write_report("\n".join(lines) + "\n", RESULTS / "apgd_l1_vs_peers.txt")


if __name__ == "__main__":
    main()
