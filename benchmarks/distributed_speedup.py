"""Data-parallel speed-up under torchrun: one process against two, for training and for evaluation.

The claim under test (issue #4): two-process torchrun training and evaluation give a measured
speed-up, and evaluation gives exactly the numbers of one process.

Both jobs run through the command line, each process with one thread (gloo backend), on the
shared MNIST data: PGD-5 adversarial training of SmallCNN for one epoch on the first N training
images, and a PGD-20 evaluation (Linf 0.3) of the trained model on the first M test images. The
speed-up is wall time of one process / wall time of two; the evaluation's summaries must be equal.
On a 2-core machine the ideal is 2x; process start-up (imports, the gloo rendezvous) and the per-batch
gradient all-reduce are the overheads. Run it on an otherwise idle machine: other work on the cores
makes the two-process run wait for the slower rank.

Usage: python benchmarks/distributed_speedup.py [--n-train 4000] [--n-eval 1000] [--eval-model zoo:NAME]
The report is printed and written to benchmarks/results/distributed_speedup.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, log, shared_data_dir, write_report  # noqa: E402


def run(command: list[str], processes: int, port: int) -> tuple[float, str]:
    """Wall seconds and stdout of ``robustlab COMMAND`` in one process or under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTLAB_BACKEND": "gloo"}
    if processes == 1:
        argv = [sys.executable, "-m", "robustlab", *command]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(port), "-m", "robustlab", *command]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return seconds, res.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--eval-model", help="model to evaluate (default: the one-process training run's model, "
                        "which one epoch leaves far from robust, so its evaluation is short); e.g. zoo:NAME")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed_speedup.txt")
    args = parser.parse_args(argv)
    root = str(shared_data_dir())
    lines = [
        "torchrun data parallelism: one process vs two (gloo, one thread each), wall time",
        "=" * 90,
        f"machine: {environment().split(', ', 2)[2]}; each process one thread",
        f"command: python benchmarks/distributed_speedup.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        times, outputs = {}, {}
        for procs in (1, 2):
            model = str(Path(tmp) / f"m{procs}.safetensors")
            train = ["train", "--model", "smallcnn", "--data", "mnist", "--data-root", root, "--num-examples", str(args.n_train),
                     "--recipe", "pgd-at:steps=5", "--eps", "0.3", "--epochs", "1", "--val-n", "0", "--out", model]
            log(f"training with {procs} process(es) ...")
            times[("train", procs)], _ = run(train, procs, 29531)
        # Evaluate one model (the one-process one) both ways: the numbers must agree exactly.
        model = args.eval_model or str(Path(tmp) / "m1.safetensors")
        for procs in (1, 2):
            evaluate = ["eval", "--model", model, "--data", "mnist", "--data-root", root, "--num-examples",
                        str(args.n_eval), "--norm", "linf", "--eps", "0.3", "--attack", "pgd:steps=20",
                        "--steps-grid", "none", "--no-sanity", "--db", str(Path(tmp) / f"e{procs}.db"), "--json"]
            log(f"evaluating with {procs} process(es) ...")
            times[("eval", procs)], out = run(evaluate, procs, 29532)
            outputs[procs] = json.loads(out)
    same = all(outputs[1][k] == outputs[2][k] for k in ("n", "clean_accuracy", "robust_accuracy"))
    lines.append(f"{'job':72s} {'1 proc s':>9s} {'2 procs s':>9s} {'speed-up':>8s}")
    jobs = {
        "train": f"PGD-5 AT, smallcnn, 1 epoch on {args.n_train} MNIST images (start-up included)",
        "eval": f"PGD-20 evaluation on {args.n_eval} MNIST test images (start-up included)",
    }
    for job, title in jobs.items():
        a, b = times[(job, 1)], times[(job, 2)]
        lines.append(f"{title:72s} {a:9.1f} {b:9.1f} {a / b:7.2f}x")
    lines.append("")
    lines.append(f"evaluated model: {args.eval_model or 'the one-process training run'}")
    lines.append(f"evaluation: clean {outputs[1]['clean_accuracy']:.4f} / {outputs[2]['clean_accuracy']:.4f}, robust "
                 f"{outputs[1]['robust_accuracy']:.4f} / {outputs[2]['robust_accuracy']:.4f} (1 / 2 processes): "
                 f"{'identical' if same else 'DIFFERENT'}")
    report = "\n".join(lines) + "\n"
    write_report(report, args.out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
