"""Where Brendel-Bethge's CPU time goes: the model (forward and backward passes, the floor a
gradient-based attack making these calls cannot beat), the per-step trust-region solver of each norm,
and the rest (start search, bookkeeping), measured in one process with ``time.process_time``.

The fidelity matrix's "floor" column for the brendel-bethge rows is total / model. On the small
benchmark models one forward and backward pass of a few images costs about a millisecond, while the
L1/L0 solver runs a nested bisection over the flat input (hundreds of elementwise passes per step)
and the Linf solver a bisection whose every round is a projection found by bisection; the solver,
not the model, sets the ratio. It is linear in the input size and independent of the model's depth,
so the ratio falls as the model grows.

Usage: python benchmarks/brendel_bethge_cost.py [--models mnist_std,cifar_std] [--n 10] [--steps 100]
Writes benchmarks/results/brendel_bethge_cost.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    ModelClock,
    environment,
    get_model,
    load_split,
    log,
    predict,
    set_threads,
    write_report,
)
from robustlab.attacks import create_attack
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel

SOLVERS = {"l2": "_step_l2", "linf": "_step_linf", "l1": "_step_l1", "l0": "_step_l0"}


def measure(model, x, y, norm: str, steps: int) -> dict:
    attack = create_attack("brendel-bethge", ThreatModel(norm, 1.0), steps=steps, lr=0.01)
    solver = getattr(attack, SOLVERS[norm])
    spent = [0.0]

    def timed(*args):
        c0 = time.process_time()
        out = solver(*args)
        spent[0] += time.process_time() - c0
        return out

    setattr(attack, SOLVERS[norm], timed)
    clock = ModelClock(model).eval()
    c0 = time.process_time()
    res = attack.run(clock, x, y, make_generator(0))
    total = time.process_time() - c0
    dist = ThreatModel(norm, 1.0).distance(res.x_adv, x)
    return {"total": total, "model": clock.seconds, "solver": spent[0], "median": float(dist.median())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_std,cifar_std")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    set_threads(1)
    lines = ["Brendel-Bethge: CPU time by part (process_time, one process), 100-step runs as in the fidelity matrix",
             f"machine: {environment()}",
             f"budget: {args.steps} steps, lr 0.01; the correctly classified among the first {args.n} test images",
             "", (f"{'model':<16}{'norm':<6}{'pts':>4}{'total s':>9}{'model s':>9}{'solver s':>10}{'rest s':>8}"
                  f"{'total/model':>13}{'solver share':>14}"), ""]
    for key in args.models.split(","):
        model, card = get_model(key)
        x, y = load_split(card["dataset"], "test")
        x, y = x[: args.n].contiguous(), y[: args.n].contiguous()
        keep = predict(model, x) == y
        x, y = x[keep].contiguous(), y[keep].contiguous()
        for norm in ("l2", "linf", "l1", "l0"):
            m = measure(model, x, y, norm, args.steps)
            line = (f"{key:<16}{norm:<6}{len(y):>4}{m['total']:>9.2f}{m['model']:>9.2f}{m['solver']:>10.2f}"
                    f"{m['total'] - m['model'] - m['solver']:>8.2f}{m['total'] / m['model']:>12.2f}x"
                    f"{100 * m['solver'] / m['total']:>13.0f}%")
            log(line)
            lines.append(line)
    write_report("\n".join(lines) + "\n", RESULTS / "brendel_bethge_cost.txt")


if __name__ == "__main__":
    main()
