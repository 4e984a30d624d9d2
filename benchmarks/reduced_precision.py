"""Square in bfloat16: would cheaper arithmetic make the standard suite faster at equal strength?

Square's 5000 forward passes per robust point are the largest share of the standard suite's time
(issue #3). On a CPU with AMX, bfloat16 forward passes cost about half of float32 ones, so running
the attack's queries under bfloat16 autocast is the obvious lever. This measures what it costs in
strength: the same model, examples, seeds and query budget, float32 against bfloat16 queries. Every
returned point is checked in float32 (a fresh forward pass, and the Linf ball), as the evaluation
runner does, so "claimed" successes that float32 does not confirm show up as such.

Measured (first 100 test images, 5000 queries, seeds 0 and 1): bfloat16 took 0.39-0.41x the CPU
time on mnist_pgd and 0.57-0.64x on cifar_at, and left far more robust: 63 and 58 against 40 and 42
images on mnist_pgd, 32 and 34 against 15 and 14 of 60 on cifar_at; 4-18 of its claimed successes were not
misclassified in float32. The suite therefore keeps float32 queries.

Usage: python benchmarks/reduced_precision.py [--models mnist_pgd,cifar_at] [--n 100] [--seeds 0,1]
The report is printed and written to benchmarks/results/reduced_precision.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, get_model, load_split, log, predict, robustlab_runtime, set_threads, write_report  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.seeding import make_generator  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

EPS = {"mnist": 0.3, "cifar10": 8 / 255}


def square_run(model, x, y, threat, queries, seed, bf16: bool) -> dict:
    """One Square run; robust accuracy and claims checked in float32."""
    attack = create_attack("square", threat, queries=queries)
    t0 = time.process_time()
    # The runtime an evaluation applies (probed in float32, with one image), then the precision.
    with robustlab_runtime(model, x), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        res = attack.run(model, x, y, generator=make_generator(seed))
    cpu = time.process_time() - t0
    fooled = (predict(model, res.x_adv) != y) & threat.contains(res.x_adv, x)
    return {"robust": int((~fooled).sum()), "claimed": int(res.success.sum()),
            "unconfirmed": int((res.success & ~fooled).sum()), "forwards": int(res.forwards.sum()), "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist_pgd,cifar_at")
    parser.add_argument("--n", type=int, default=100, help="first N test images (the clean-correct ones are attacked)")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=RESULTS / "reduced_precision.txt")
    args = parser.parse_args()
    set_threads(1)
    lines = [f"# Square: float32 against bfloat16 queries ({args.queries} queries, Linf; {environment()})", "",
             "| model | seed | attacked | robust fp32 | robust bf16 | bf16 claims not confirmed in fp32 | CPU bf16 / fp32 |",
             "|---|---|---|---|---|---|---|"]
    for key in args.models.split(","):
        model, _ = get_model(key)
        dataset = "mnist" if key.startswith("mnist") else "cifar10"
        threat = ThreatModel("linf", EPS[dataset])
        x, y = load_split(dataset, "test")
        x, y = x[: args.n], y[: args.n]
        keep = predict(model, x) == y
        x, y = x[keep], y[keep]
        for seed in (int(s) for s in args.seeds.split(",")):
            runs = {}
            for bf16 in (False, True):
                runs[bf16] = square_run(model, x, y, threat, args.queries, seed, bf16)
                log(f"{key} seed {seed} {'bf16' if bf16 else 'fp32'}: {runs[bf16]}")
            f, b = runs[False], runs[True]
            lines.append(f"| {key} | {seed} | {len(y)} | {f['robust']} | {b['robust']} | {b['unconfirmed']} of "
                         f"{b['claimed']} | {b['cpu'] / f['cpu']:.2f} ({b['cpu']:.0f} s / {f['cpu']:.0f} s) |")
    lines += ["", "Robust counts are of the attacked (clean-correct) images, checked in float32 with the returned points "
              "inside the ball.", ""]
    write_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
