"""L0 attacks on the issue-20 LeNet (MNIST): FMN-L0 against foolbox's L0FMNAttack (minimum norm),
JSMA against ART's SaliencyMapMethod and torchattacks' JSMA, and Sparse-RS (no peer implements it:
compared with random pixels at colour-cube corners with the same number of queries, and with the
white-box attacks) at a budget of ``k`` pixels.

Data: the correctly classified ones among the first N MNIST test images. A point counts as broken
only if a fresh forward pass misclassifies it and it differs from the clean image in at most k pixels
(fixed budget) -- for the minimum-norm attacks the median number of changed pixels is printed
(failure = infinite). Untargeted everywhere: robustlab's JSMA aims at the most likely other class;
ART's and torchattacks' JSMA pick their own target (ART: a random other class; torchattacks: as its
docs say), so the JSMA rows compare implementations of the same paper, not the same target choice.

Usage: python benchmarks/l0_attacks_vs_peers.py [--n 50] [--k 12] [--threads 1]
Writes benchmarks/results/l0_attacks_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, log, set_threads, write_report  # noqa: E402
from benchmarks.lenet_mnist import correct_test_images, get_lenet  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.threat import ThreatModel, norms  # noqa: E402


def pixels(model, x, y, x_adv):
    with torch.no_grad():
        ok = (model(x_adv).argmax(1) != y) & ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
    d = norms(x_adv - x, "l0")
    return torch.where(ok, d, torch.full_like(d, math.inf))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = get_lenet()
    x, y = correct_test_images(model, args.n)
    k, gen = args.k, torch.Generator().manual_seed(0)
    rows = []

    def add(name, d, seconds):
        broken = int((d <= k).sum())
        rows.append(f"{name:<44} broken within {k} px: {broken:>3}/{len(y)}  median pixels {d.median().item():7.1f}  "
                    f"{seconds:7.1f} s")
        log(rows[-1])
        return broken

    t = time.process_time()
    r = create_attack("fmn", ThreatModel("l0", 0)).run(model, x, y, gen)
    fmn = pixels(model, x, y, r.x_adv)
    add("robustlab fmn l0 (100 steps, minimum norm)", fmn, time.process_time() - t)
    import foolbox as fb

    t = time.process_time()
    raw, _, _ = fb.attacks.L0FMNAttack(steps=100)(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    fb_d = pixels(model, x, y, raw)
    add("foolbox L0FMNAttack (100 steps)", fb_d, time.process_time() - t)
    threat = ThreatModel("l0", k)
    t = time.process_time()
    r = create_attack("sparse-rs", threat, queries=1000).run(model, x, y, gen)
    add("robustlab sparse-rs (1000 queries)", pixels(model, x, y, r.x_adv), time.process_time() - t)
    # Random search without the swaps: 1000 independent random draws of k corner pixels.
    t = time.process_time()
    best = torch.full((len(y),), math.inf)
    for _ in range(1000):
        cand = threat.random_init(x, gen)
        best = torch.minimum(best, pixels(model, x, y, cand))
    add("random k pixels at corners (1000 draws)", best, time.process_time() - t)
    t = time.process_time()
    r = create_attack("jsma", threat).run(model, x, y, gen)
    rl_jsma = add("robustlab jsma (theta 1)", pixels(model, x, y, r.x_adv), time.process_time() - t)
    from art.attacks.evasion import SaliencyMapMethod
    from art.estimators.classification import PyTorchClassifier

    t = time.process_time()
    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    x_art = torch.from_numpy(SaliencyMapMethod(clf, theta=1.0, gamma=k / 784, verbose=False).generate(x.numpy()))
    art_jsma = add("ART SaliencyMapMethod (theta 1, gamma k/784)", pixels(model, x, y, x_art), time.process_time() - t)
    lines = [f"L0 attacks on the issue-20 LeNet (MNIST): {len(y)} correctly classified of the first {args.n} test "
             f"images; budget k = {k} pixels; {environment()}", ""] + rows + [""]
    med_rl, med_fb = fmn.median().item(), fb_d.median().item()
    lines.append(f"{'PASS' if med_rl <= med_fb else 'FAIL'}  fmn l0 median pixels {med_rl:.1f} vs foolbox {med_fb:.1f}")
    lines.append(f"{'PASS' if rl_jsma >= art_jsma - 0.005 * len(y) else 'FAIL'}  jsma broken {rl_jsma} vs ART {art_jsma}")
    write_report("\n".join(lines) + "\n", RESULTS / "l0_attacks_vs_peers.txt")


if __name__ == "__main__":
    main()
