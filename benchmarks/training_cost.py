"""Cost of adversarial training against standard training, measured side by side in one run.

The claim under test (issue #4): on the same model and data, one epoch of

- fast AT (FGSM from a random start, Wong et al. 2020) costs at most 2.3x a standard epoch;
- PGD-k AT (Madry et al. 2018) costs at most (k + 1) x 1.15 a standard epoch, for k = 2, 5, 10.

A standard step is one forward and one backward pass (to the parameters); each attack step adds one
forward pass and one backward pass to the input only, so the physical ratio is about
``1 + k * (attack step / standard step)``, below ``k + 1`` because the attack's backward pass skips
the weight gradients. The (k + 1) x 1.15 bound leaves 15% for the loop's own overhead.

Every contender runs one epoch of ``robustlab.training.train`` (the loop the CLI uses, no validation,
no checkpoints) from the same initial weights on the same data; the epochs are timed interleaved
(round r runs them in a rotated order) and the median is reported. Default: the MNIST SmallCNN of
TRADES/MART on the first 5,000 MNIST training images from ../shared/data (or $ROBUSTLAB_SHARED_DATA);
without the shared data, digits_cnn on the embedded sklearn digits.

Two clocks are read for every epoch: wall time and the process's CPU time. With one thread on a quiet
machine they agree; on a shared machine wall time also counts the time other programs held the core,
so the verdicts use the CPU-time ratios and the wall-time ratios are printed beside them.

Usage: python benchmarks/training_cost.py [--n 5000] [--batch-size 128] [--repeats 3] [--threads 1] [--quick]
The report is printed and written to benchmarks/results/training_cost.txt.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, log, set_threads, write_report  # noqa: E402
from robustlab.data import ImageDataset, load_dataset  # noqa: E402
from robustlab.models import create_model  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402
from robustlab.training import TrainConfig, create_objective, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_data(n: int) -> tuple[ImageDataset, str, float]:
    """(training subset, architecture, Linf eps): MNIST + smallcnn at 0.3, else digits + digits_cnn at 0.1."""
    env = os.environ.get("ROBUSTLAB_SHARED_DATA", "").strip()
    root = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if (root / "mnist_train.npz").is_file():
        return load_dataset("mnist", "train", root=root).subset(n), "smallcnn", 0.3
    log(f"no MNIST in {root}; falling back to the embedded digits")
    return load_dataset("digits", "train").subset(n), "digits_cnn", 0.1


def contenders(model: torch.nn.Module, data: ImageDataset, threat: ThreatModel, batch_size: int, steps: list[int]):
    """name -> (target ratio or None, callable running one epoch from the same initial weights)."""
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, schedule="constant")
    recipes: dict[str, tuple[float | None, object]] = {"standard": (None, create_objective("standard", threat)),
                                                        "fast-at": (2.3, create_objective("fast-at", threat))}
    for k in steps:
        recipes[f"pgd-{k}-at"] = ((k + 1) * 1.15, create_objective("pgd-at", threat, steps=k))

    def epoch(objective):
        def run() -> None:
            net = copy.deepcopy(model)
            train(net, data, config, objective, progress=False)

        return run

    return {name: (target, epoch(obj)) for name, (target, obj) in recipes.items()}


def time_epochs(runs: dict[str, object], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Run every contender ``repeats`` times, interleaved in rotated order; wall and CPU seconds."""
    names = list(runs)
    out = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[name]()
            out[name]["wall"].append(time.perf_counter() - w0)
            out[name]["cpu"].append(time.process_time() - c0)
            log(f"  {name}: {out[name]['wall'][-1]:.2f} s wall, {out[name]['cpu'][-1]:.2f} s CPU")
    return out


def format_report(rows: list[dict], args: argparse.Namespace, setup: str, wall: float) -> str:
    lines = [
        "Adversarial training cost: seconds per epoch of robustlab.training.train, side by side",
        f"setup: {setup}",
        f"environment: {environment()}",
        f"timing: median of {args.repeats} interleaved epochs per recipe (after a warm-up epoch on a small subset);",
        "verdicts on CPU-time ratios (see the docstring), wall-time ratios beside them",
        "",
        f"{'recipe':<12} {'CPU s/epoch':>11} {'ratio':>7} {'wall s/epoch':>12} {'ratio':>7} {'target':>9}  verdict",
    ]
    for r in rows:
        target = f"<={r['target']:.2f}x" if r["target"] else ""
        verdict = "" if r["target"] is None else ("ok" if r["cpu_ratio"] <= r["target"] else "MISSED")
        lines.append(f"{r['name']:<12} {r['cpu']:>11.2f} {r['cpu_ratio']:>6.2f}x {r['wall']:>12.2f} "
                     f"{r['wall_ratio']:>6.2f}x {target:>9}  {verdict}")
    lines += ["", "all epochs (CPU s / wall s):"]
    for r in rows:
        lines.append(f"  {r['name']:<12} " + ", ".join(f"{c:.2f}/{w:.2f}" for c, w in zip(r["cpu_all"], r["wall_all"])))
    lines += ["", f"wall time of the benchmark: {wall:.0f} s"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", default="2,5,10", help="PGD steps k of the PGD-k AT contenders")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1,000 images, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_cost.txt")
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = min(args.n, 1000), 1
    set_threads(args.threads)
    t_start = time.perf_counter()
    data, arch, eps = load_data(args.n)
    threat = ThreatModel("linf", eps)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=data.num_classes, in_channels=data.image_shape[0])
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    setup = (f"{arch} on {len(data)} {data.name} training images, batch {args.batch_size}, {threat}, "
             f"PGD step 2.5 eps / k, fast AT step 1.25 eps")
    log(f"timing one epoch of standard, fast-at and pgd-k-at (k = {args.steps}) on {setup}")
    runs = contenders(model, data, threat, args.batch_size, steps)
    # Warm-up (imports, allocator, first-call costs) on a small subset, then the timed epochs.
    small = contenders(model, data.subset(2 * args.batch_size), threat, args.batch_size, steps)
    for _, run in small.values():
        run()
    timed = time_epochs({name: run for name, (_, run) in runs.items()}, args.repeats)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timed.items()}
    rows = [{"name": name, "target": target, "cpu": med[name]["cpu"], "wall": med[name]["wall"],
             "cpu_ratio": med[name]["cpu"] / med["standard"]["cpu"], "wall_ratio": med[name]["wall"] / med["standard"]["wall"],
             "cpu_all": timed[name]["cpu"], "wall_all": timed[name]["wall"]} for name, (target, _) in runs.items()]
    report = format_report(rows, args, setup, time.perf_counter() - t_start)
    write_report(report, args.out)
    return 0 if all(r["target"] is None or r["cpu_ratio"] <= r["target"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
