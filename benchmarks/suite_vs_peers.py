"""The ``standard`` suite against AutoAttack's reference protocol and torchattacks' AutoAttack.

The claim under test (issue #3):

- Strength: on every model, ``robustlab eval --attack standard`` leaves a robust accuracy no higher
  than (a) the reference-settings baseline and (b) torchattacks' ``AutoAttack`` class, on the same
  examples.
- Speed: ``--attack standard`` takes at most half the time of the reference-settings baseline and
  no more than torchattacks' ``AutoAttack``.

The reference-settings baseline is built from torchattacks' single attacks at AutoAttack's published
settings (torchattacks' ``AutoAttack`` class runs its APGD, APGD-T and FAB with 10 steps, about a ninth
of the reference gradient work): APGD-CE 100 steps, APGD-T 9 target classes x 100 steps, FAB-T 9
targets x 100 steps, Square 5000 queries, each run only on the points still robust after the ones
before it, worst case per sample. Every success any tool claims is re-verified the same way: a fresh
forward pass on the returned point, which must also lie inside the ball (tolerance 1e-5) and the box.

robustlab runs exactly what ``--attack standard`` runs: the evaluation runner with the ``standard``
suite (main task only: no epsilon or strength curves, no sanity tasks, which the CLI adds on top and
which the peers do not do), writing its per-sample results into a temporary results store.

Models (benchmarks/common.py, trained and cached on first use): a standard and a PGD-trained SmallCNN
on MNIST (Linf 0.3), a standard and a PGD-trained cifar_cnn on CIFAR-10 (Linf 8/255).

Memory layout: robustlab's evaluation runs a convolutional model channels-last on CPU (it converts
the model for the run and gives it back as it was; oneDNN convolutions and max-pooling are much
faster so). The peers run the model as they are given it. So that the comparison also shows what
the algorithms cost on equal terms, each peer runs a second time on a channels-last copy of the
model (``reference-cl``, ``autoattack-cl``), with its own checks.

Timing: process CPU time at one thread (the machine may be shared); wall seconds in brackets. Each
tool runs once per model on the same first-N test examples, in rotating order. Each tool's model
is wrapped in ``common.ModelClock``, which adds up the CPU time spent inside the model (``model s``):
robustlab's model time over a peer's total time is the lowest ratio any implementation making
robustlab's model calls could reach.

Usage: python benchmarks/suite_vs_peers.py [--n 100] [--models mnist_pgd,cifar_at] [--quick]
The report is printed and written to benchmarks/results/suite_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
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
from robustlab.attacks.suites import SUITES  # noqa: E402
from robustlab.eval.store import ResultsStore  # noqa: E402
from robustlab.eval.runner import EvalOptions, evaluate  # noqa: E402
from robustlab.data import ImageDataset  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

EPS = {"mnist": 0.3, "cifar10": 8 / 255}
EPS_TEXT = {"mnist": "0.3", "cifar10": "8/255"}
SPEED_REFERENCE = 0.5  # robustlab time / reference-settings baseline time
TOOLS = ("robustlab", "reference", "autoattack", "reference-cl", "autoattack-cl")
SUITE_NAMES = ("apgd-ce", "apgd-t", "fab-t", "square")


def _verified_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel):
    """True where the returned point is not a valid adversarial example (correct, or outside the
    threat model)."""
    inside = threat.contains(x_adv, x, tol=1e-5)
    return (predict(model, x_adv) == y) | ~inside


def run_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> dict:
    """torchattacks' components at the reference settings, still-robust points only, worst case."""
    import torchattacks

    threat = ThreatModel("linf", eps)
    stages = [
        ("apgd-ce", torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed)),
        ("apgd-t", torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=seed)),
        ("fab-t", torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                                   n_classes=10, seed=seed)),
        ("square", torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed,
                                       resc_schedule=False)),
    ]
    c0, w0 = time.process_time(), time.perf_counter()
    robust = predict(model, x) == y
    per_stage = {}
    for name, attack in stages:
        s0 = time.process_time()
        idx = robust.nonzero(as_tuple=True)[0]
        if len(idx):
            x_adv = attack(x[idx], y[idx]).detach()
            robust[idx] = _verified_robust(model, x[idx], y[idx], x_adv, threat)
        per_stage[name] = {"cpu": time.process_time() - s0, "robust": float(robust.float().mean())}
    return {"robust": robust, "cpu": time.process_time() - c0, "wall": time.perf_counter() - w0, "stages": per_stage}


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> dict:
    """torchattacks' ``AutoAttack`` class (version 'standard'), one call on all examples."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=seed)
    c0, w0 = time.process_time(), time.perf_counter()
    x_adv = attack(x, y).detach()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"robust": _verified_robust(model, x, y, x_adv, ThreatModel("linf", eps)), "cpu": cpu, "wall": wall}


def run_robustlab(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int, dataset: str) -> dict:
    """``--attack standard``: the evaluation runner with the standard suite, main task only."""
    threat = ThreatModel("linf", eps)
    data = ImageDataset(dataset, "test", x, y, [str(i) for i in range(10)])
    options = EvalOptions(steps_grid=(), sanity=False, seed=seed, batch_size=len(y), examples=0)
    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "results.db") as store:
        c0, w0 = time.process_time(), time.perf_counter()
        result = evaluate(model, data, SUITES.get("standard")(threat), store, options=options)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rows = sorted(store.samples(result.run_id), key=lambda r: r.sample_index)
        costs = store.attack_costs(result.run_id)
    robust = torch.tensor([r.robust for r in rows])
    return {"robust": robust, "cpu": cpu, "wall": wall, "costs": costs}


def run_model(key: str, n: int, seed: int, order: tuple[str, ...]) -> dict:
    model, card = get_model(key)
    dataset = card["dataset"]
    x_all, y_all = load_split(dataset, "test")
    x, y = x_all[:n].contiguous(), y_all[:n].contiguous()
    eps = EPS[dataset]
    clean = float((predict(model, x) == y).float().mean())
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    clocks = {tool: ModelClock(model_cl if tool.endswith("-cl") else model).eval() for tool in TOOLS}
    runs = {
        "robustlab": lambda: run_robustlab(clocks["robustlab"], x, y, eps, seed, dataset),
        "reference": lambda: run_reference(clocks["reference"], x, y, eps, seed),
        "autoattack": lambda: run_autoattack(clocks["autoattack"], x, y, eps, seed),
        "reference-cl": lambda: run_reference(clocks["reference-cl"], x, y, eps, seed),
        "autoattack-cl": lambda: run_autoattack(clocks["autoattack-cl"], x, y, eps, seed),
    }
    out = {}
    for tool in order:
        log(f"  {tool} on {n} examples ...")
        out[tool] = runs[tool]()
        out[tool]["model_cpu"] = clocks[tool].seconds
        log(f"    robust {100 * float(out[tool]['robust'].float().mean()):.1f}%, {out[tool]['cpu']:.1f} s CPU")
    return {"key": key, "dataset": dataset, "eps": EPS_TEXT[dataset], "n": n, "clean": clean, "card": card,
            "tools": out}


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab --attack standard vs the reference protocol (torchattacks components) and torchattacks' AutoAttack")
    out("=" * 100)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/suite_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; first N test examples; robust acc re-verified by a fresh forward pass (in ball, tol 1e-5)")
    out("time: process CPU seconds at one thread (wall seconds in brackets); only: examples left robust by")
    out("that tool only / by robustlab only")
    out("reference = torchattacks APGD-CE 100, APGD-T 9x100, FAB-T 9x100, Square 5000, still-robust points only")
    out("autoattack = torchattacks.AutoAttack(version='standard') (APGD/APGD-T/FAB-T with 10 steps, Square 5000)")
    out("-cl: the same on a channels-last copy of the model (robustlab's runner uses that layout on CPU by itself)")
    out("model s: CPU seconds inside the model (its forward passes, and backward passes from logits to input);")
    out("the rest of a tool's CPU time is its own overhead")
    out("")
    checks: list[tuple[str, bool, str]] = []
    for r in results:
        card = r["card"]
        out("-" * 100)
        out(f"{r['key']} ({card['architecture']}, clean test acc {100 * card['clean_accuracy']:.2f}%)  linf eps={r['eps']}  "
            f"N={r['n']}  clean on N {100 * r['clean']:.1f}%")
        ours = r["tools"]["robustlab"]
        out(f"  {'tool':13s} {'robust acc':>10s} {'rl - tool':>9s} {'only':>7s} {'CPU s':>9s} {'(wall)':>8s} "
            f"{'model s':>8s} {'rl / tool':>9s}")
        for tool in TOOLS:
            t = r["tools"][tool]
            acc = 100 * float(t["robust"].float().mean())
            if tool == "robustlab":
                out(f"  {tool:13s} {acc:9.1f}% {'':>9s} {'':>7s} {t['cpu']:9.1f} ({t['wall']:6.1f}) {t['model_cpu']:8.1f}")
                continue
            gap = 100 * float(ours["robust"].float().mean()) - acc
            only = f"{int((t['robust'] & ~ours['robust']).sum())}/{int((~t['robust'] & ours['robust']).sum())}"
            ratio = ours["cpu"] / t["cpu"]
            out(f"  {tool:13s} {acc:9.1f}% {gap:+9.1f} {only:>7s} {t['cpu']:9.1f} ({t['wall']:6.1f}) "
                f"{t['model_cpu']:8.1f} {ratio:9.2f}")
            checks.append((f"strength {r['key']} vs {tool}", gap <= 0.0, f"{gap:+.1f} pt"))
            budget = SPEED_REFERENCE if tool.startswith("reference") else 1.0
            checks.append((f"speed    {r['key']} vs {tool}", ratio <= budget, f"{ratio:.2f}x (budget <= {budget})"))
        bound = ", ".join(f"{ours['model_cpu'] / r['tools'][tool]['cpu']:.2f}x {tool}" for tool in TOOLS[1:])
        out(f"  robustlab's model calls alone (its model s) already cost {bound}: no implementation making")
        out("  the same calls, in the same layout, can be faster than that")
        stages = r["tools"]["reference"]["stages"]
        total = sum(s["cpu"] for s in stages.values()) or 1.0
        out("  reference, where the time goes: " + ", ".join(
            f"{name} {100 * s['cpu'] / total:.0f}% (robust after {100 * s['robust']:.1f}%)" for name, s in stages.items()))
        costs = ours.get("costs") or []
        if costs:
            out("  robustlab, per attack (gradients / forwards per example): " + ", ".join(
                f"{name} {c['gradients'] / r['n']:.0f}/{c['forwards'] / r['n']:.0f} ({c['seconds']:.1f} s)"
                for name, c in zip(SUITE_NAMES, costs)))
        out("")
    out("=" * 100)
    out("checks (strength: robustlab robust acc - tool <= 0; speed: robustlab CPU time / reference <= 0.5, / autoattack <= 1.0)")
    for name, ok, value in checks:
        out(f"  {'PASS' if ok else 'FAIL':5s} {name}: {value}")
    out(f"total wall time {wall:.0f} s, CPU time {time.process_time():.0f} s (model training included when it ran)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test examples per model")
    parser.add_argument("--models", default="mnist_std,mnist_pgd,cifar_std,cifar_at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run on 20 examples")
    parser.add_argument("--out", type=Path, default=RESULTS / "suite_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 20
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    t0 = time.perf_counter()
    for key in keys:
        get_model(key)  # train (first run only) before anything is timed
    results = []
    for i, key in enumerate(keys):
        log(f"== {key}")
        order = TOOLS[i % len(TOOLS):] + TOOLS[: i % len(TOOLS)]
        results.append(run_model(key, args.n, args.seed, order))
    report = format_report(results, args, time.perf_counter() - t0)
    if args.quick:  # a smoke run leaves the recorded results alone
        print(report, end="")
    else:
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
