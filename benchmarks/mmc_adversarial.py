"""MMC (Max-Mahalanobis centers, Pang et al. ICLR 2020) against cross-entropy, each standard-trained
and with PGD adversarial training, on MNIST at Linf 0.3: every attack on every model, and the
per-sample worst case.

    python benchmarks/mmc_adversarial.py [--n 100] [--square 5000]

Models (benchmarks/common.py, small CPU budgets): ``mnist_std`` (CE) and ``mnist_mmc`` (MMC loss,
radius 10) trained alike; ``mnist_pgd`` (CE at PGD points) and ``mnist_mmc_pgd`` (``mmc-at``: the
MMC loss at PGD points of the MMC loss) fine-tuned from them alike (15,000 images, one epoch, PGD-5
of step 0.1, epsilon warmed up over the first 30%).

Attacks, each on every clean-correct point (so each column is that attack alone): PGD-CE 100 steps
(what an evaluation that ignores the MMC rule runs: cross-entropy saturates on the MMC head), APGD-CE,
APGD-DLR (the adaptive attack an MMC checkpoint declares, ``margin-loss``), APGD-T (targeted DLR, 9
targets) and Square (score-based, margin loss). "worst case" is the per-sample worst case over all.
Every success is checked here: the point is inside the ball and the model misclassifies it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, sign_test, write_report  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

EPS = 0.3
THREAT = ThreatModel("linf", EPS)
MODELS = [("CE, standard", "mnist_std"), ("MMC, standard", "mnist_mmc"),
          ("CE + PGD-AT", "mnist_pgd"), ("MMC + PGD-AT", "mnist_mmc_pgd")]


def attacks(square: int) -> list[tuple[str, object]]:
    return [
        ("PGD-CE 100", create_attack("pgd", THREAT, steps=100)),
        ("APGD-CE", create_attack("apgd-ce", THREAT, steps=100)),
        ("APGD-DLR", create_attack("apgd-dlr", THREAT, steps=100)),
        ("APGD-T (9 targets)", create_attack("apgd-t", THREAT, steps=100)),
        (f"Square {square}", create_attack("square", THREAT, queries=square)),
    ]


def robust_mask(model, attack, x, y, clean: torch.Tensor) -> tuple[torch.Tensor, float]:
    idx = clean.nonzero(as_tuple=True)[0]
    t0 = time.process_time()
    res = attack.run(model, x[idx], y[idx], torch.Generator().manual_seed(0))
    seconds = time.process_time() - t0
    inside = THREAT.contains(res.x_adv, x[idx])
    with torch.no_grad():
        wrong = model(res.x_adv).argmax(1) != y[idx]
    out = clean.clone()
    out[idx[wrong & inside]] = False
    return out, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--square", type=int, default=5000, help="Square's queries")
    args = p.parse_args()
    set_threads(1)
    x, y = load_split("mnist", "test")
    x, y = x[: args.n], y[: args.n]
    names = [name for name, _ in attacks(args.square)]
    rows, worst_of = [], {}
    for label, key in MODELS:
        model, card = get_model(key)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        worst, cells = clean.clone(), []
        for name, attack in attacks(args.square):
            mask, seconds = robust_mask(model, attack, x, y, clean)
            worst &= mask
            cells.append(f"{100 * float(mask.sum()) / args.n:5.1f}% ({seconds:.0f} s)")
            log(f"[{label}] {name}: {int(mask.sum())} robust ({seconds:.0f} s)")
        worst_of[key] = worst
        rows.append(f"| {label} ({key}) | {100 * float(clean.sum()) / args.n:5.1f}% | "
                    f"{100 * card['clean_accuracy']:.1f}% | " + " | ".join(cells)
                    + f" | {100 * float(worst.sum()) / args.n:5.1f}% |")
    lines = ["# MMC vs cross-entropy, standard and adversarially trained (MNIST, Linf 0.3)", "", environment(), "",
             f"First {args.n} MNIST test images; robust accuracy of each attack alone (CPU seconds), and the per-sample "
             "worst case over all of them.", "",
             "| model | clean | clean (full test split) | " + " | ".join(names) + " | worst case |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |", *rows, "",
             "Paired on the same images (worst case): robust under MMC only / under CE only, and the one-sided sign "
             "test's p-value that MMC is no better.", ""]
    for ce, mmc in (("mnist_std", "mnist_mmc"), ("mnist_pgd", "mnist_mmc_pgd")):
        only_mmc = int((worst_of[mmc] & ~worst_of[ce]).sum())
        only_ce = int((worst_of[ce] & ~worst_of[mmc]).sum())
        lines.append(f"- {mmc} vs {ce}: {only_mmc} / {only_ce} images, p = {sign_test(only_mmc, only_ce):.2g}")
    lines.append("")
    write_report("\n".join(lines), RESULTS / "mmc_adversarial.txt")


if __name__ == "__main__":
    main()
