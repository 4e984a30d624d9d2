"""APGD and Square fidelity and speed: robustlab against torchattacks.

The claim under test (issue #3):

- Fidelity: on the same model and the same examples, at the same budget (steps, restarts, target
  classes, queries, eps), robustlab's ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` and ``square`` are never
  weaker than torchattacks' ``APGD(loss='ce')``, ``APGD(loss='dlr')``, ``APGDT`` and ``Square``: the
  robust accuracy robustlab leaves is at most 0.5 points above torchattacks'.
- Speed: robustlab takes no more time than torchattacks on the same batch.

Every tool gets the same model (eval mode), the same first-N test examples and the same budget.
Robust accuracy is measured the same way for both: a fresh forward pass on the returned batch; the
returned points are also checked to lie in the threat model. Both tools see the model through the same
thin wrapper that counts the images it is given (forward passes and those with an input gradient), so
the report shows where the time goes: robustlab drops a sample from the batch as soon as it is
misclassified, torchattacks' APGD keeps computing on the whole batch for all its steps.

Timing: the machine may be shared, so the primary number is this process's CPU time
(``time.process_time``, one intra-op thread); wall time is printed next to it. Each tool runs once per
row on all N examples (the runs are long enough for one measurement to be stable); the order of the
two tools alternates from row to row.

Cost: the default run takes about 10 minutes of CPU (one thread, both tools). Square with 5000
queries on the PGD-trained MNIST model dominates: about 1.6 s of CPU per example and tool when the
example survives (robust accuracy ~40%), so its N is small; raise the --n-* options for tighter
numbers (with N examples one example is 100/N points of robust accuracy, and two random-search or
random-start attacks disagree on a few examples either way: the "only" column shows how many).
APGD-CE over three seeds on 300 MNIST examples (100 steps): robustlab - torchattacks = -0.3, 0.0,
-1.3 points; APGD-DLR: +0.7, 0.0, +0.3 points.

Usage: python benchmarks/apgd_square_vs_peers.py [--quick] [--only apgd-ce,square] [--seed 0]
The report is printed and written to benchmarks/results/apgd_square_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    Counter,
    environment,
    fidelity_status,
    get_model,
    load_split,
    log,
    predict,
    robustlab_runtime,
    set_threads,
    write_report,
)
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.seeding import make_generator  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

FIDELITY_SLACK = 0.5  # points of robust accuracy robustlab may lie above torchattacks
SPEED_BUDGET = 1.0  # robustlab CPU time / torchattacks CPU time

TOOLS = ("robustlab", "torchattacks")


@dataclass
class Row:
    """One comparison: a model, a threat model, an attack and its budget, the first n examples."""

    model_key: str
    norm: str  # linf | l2
    eps: float
    eps_label: str
    attack: str  # apgd-ce | apgd-dlr | apgd-t | square
    n: int
    params: dict[str, Any] = field(default_factory=dict)  # robustlab parameters (the budget)

    @property
    def threat_title(self) -> str:
        return f"{self.model_key}  {self.norm} eps={self.eps_label}"

    @property
    def budget(self) -> str:
        p = self.params
        if self.attack == "square":
            return f"{p['queries']} queries"
        text = f"{p['steps']} steps"
        if self.attack == "apgd-t":
            text += f" x {p['n_target_classes']} targets"
        return text


# ---------------------------------------------------------------------- the contenders


AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_attacks(model: nn.Module, row: Row, seed: int) -> dict[str, AttackFn]:
    """Each tool's attack for this row as a function (x, y) -> x_adv, built outside the timed region."""
    import torchattacks

    p = row.params
    threat = ThreatModel(row.norm, row.eps)
    ours = create_attack(row.attack, threat, **p)

    def run_robustlab(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with robustlab_runtime(model, x):  # as an evaluation runs it
            return ours.run(model, x, y, make_generator(seed, 0)).x_adv

    norm = {"linf": "Linf", "l2": "L2"}[row.norm]
    restarts = p.get("restarts", 1)
    if row.attack in ("apgd-ce", "apgd-dlr"):
        peer = torchattacks.APGD(model, norm=norm, eps=row.eps, steps=p["steps"], n_restarts=restarts, seed=seed,
                                 loss=row.attack.split("-")[1], eot_iter=1, rho=0.75)
    elif row.attack == "apgd-t":
        # torchattacks attacks n_classes - 1 target classes.
        peer = torchattacks.APGDT(model, norm=norm, eps=row.eps, steps=p["steps"], n_restarts=restarts, seed=seed,
                                  eot_iter=1, rho=0.75, n_classes=p["n_target_classes"] + 1)
    elif row.attack == "square":
        peer = torchattacks.Square(model, norm=norm, eps=row.eps, n_queries=p["queries"], n_restarts=restarts,
                                   p_init=0.8, loss="margin", resc_schedule=True, seed=seed)
    else:
        raise ValueError(row.attack)

    def run_torchattacks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return peer(x, y)

    return {"robustlab": run_robustlab, "torchattacks": run_torchattacks}


# ---------------------------------------------------------------------- one row


def run_row(row: Row, index: int, seed: int) -> dict:
    model, card = get_model(row.model_key)
    counter = Counter(model).eval()
    x_all, y_all = load_split(card["dataset"], "test")
    x, y = x_all[: row.n].contiguous(), y_all[: row.n].contiguous()
    threat = ThreatModel(row.norm, row.eps)
    clean = float((predict(model, x) == y).float().mean())
    attacks = make_attacks(counter, row, seed)
    order = TOOLS if index % 2 == 0 else TOOLS[::-1]
    out: dict[str, dict] = {}
    for tool in order:
        log(f"  {tool}: {row.attack} ({row.budget}) on {len(y)} examples ...")
        counter.images = counter.grad_images = 0
        c0, w0 = time.process_time(), time.perf_counter()
        x_adv = attacks[tool](x, y).detach().to(x.dtype)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        correct = predict(model, x_adv) == y
        out[tool] = {
            "robust": correct,
            "robust_acc": float(correct.float().mean()),
            "valid": float(threat.contains(x_adv, x, tol=1e-5).float().mean()),
            "cpu": cpu,
            "wall": wall,
            "images": counter.images,
            "grad_images": counter.grad_images,
        }
        log(f"    robust accuracy {100 * out[tool]['robust_acc']:.1f}%, {cpu:.1f} s CPU, {wall:.1f} s wall")
    return {"row": row, "clean": clean, "card": card, "tools": out}


# ---------------------------------------------------------------------- report


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab APGD / Square vs torchattacks: fidelity and speed")
    out("=" * 100)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/apgd_square_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; one run per tool and row on the same first-N test examples; time = CPU seconds of this "
        "process (one thread; wall seconds in brackets: the machine may be shared)")
    out("robust acc: fresh forward pass on the returned points; only: examples left robust by robustlab only / by "
        "torchattacks only")
    out("fwd/grad: images the model was given per example (all / with an input gradient)")
    out("")
    out("models (trained by benchmarks/common.py, cached in benchmarks/.cache/):")
    seen = set()
    for r in results:
        key = r["row"].model_key
        if key in seen:
            continue
        seen.add(key)
        card, rec = r["card"], r["card"]["training"]["recipe"]
        how = (f"PGD-AT linf eps={rec['adversarial']['eps']} steps={rec['adversarial']['steps']} from {rec['init']}"
               if rec.get("adversarial") else "standard")
        out(f"  {key:10s} {card['architecture']:9s} {how}; clean test acc {100 * card['clean_accuracy']:.2f}% "
            "(full test split)")
    checks: list[tuple[str, str, str]] = []
    title = None
    for r in results:
        row: Row = r["row"]
        t = r["tools"]
        if row.threat_title != title:
            title = row.threat_title
            out("")
            out("-" * 100)
            out(title)
            out(f"  {'attack':9s} {'budget':21s} {'N':>4s} {'clean':>6s} {'robustlab':>9s} {'torchatt.':>9s} "
                f"{'rl - ta':>7s} {'only':>5s} {'rl s':>14s} {'ta s':>14s} {'rl/ta':>5s} {'rl fwd/grad':>11s} "
                f"{'ta fwd/grad':>11s}")
        rl, ta = t["robustlab"], t["torchattacks"]
        gap = 100 * (rl["robust_acc"] - ta["robust_acc"])
        ratio = rl["cpu"] / max(ta["cpu"], 1e-9)
        n = row.n

        def work(d: dict) -> str:
            return f"{d['images'] / n:.0f}/{d['grad_images'] / n:.0f}"

        # Left robust by robustlab only (torchattacks broke them) / by torchattacks only.
        peer_wins, rl_wins = int((rl["robust"] & ~ta["robust"]).sum()), int((ta["robust"] & ~rl["robust"]).sum())
        only = f"{peer_wins}/{rl_wins}"
        out(f"  {row.attack:9s} {row.budget:21s} {n:4d} {100 * r['clean']:5.1f}% {100 * rl['robust_acc']:8.1f}% "
            f"{100 * ta['robust_acc']:8.1f}% {gap:+7.1f} {only:>5s} {rl['cpu']:6.1f} ({rl['wall']:5.0f}) "
            f"{ta['cpu']:6.1f} ({ta['wall']:5.0f}) {ratio:5.2f} {work(rl):>11s} {work(ta):>11s}")
        bad = [tool for tool in TOOLS if t[tool]["valid"] < 1.0]
        if bad:
            out("    outside the threat model (tol 1e-5): " + ", ".join(
                f"{tool} {100 * (1 - t[tool]['valid']):.1f}%" for tool in bad))
        name = f"{row.threat_title}  {row.attack} ({row.budget}, N={n})"
        status, p_value = fidelity_status(gap, FIDELITY_SLACK, peer_wins, rl_wins)
        if rl["valid"] < 1.0:
            status = "FAIL"
        checks.append((f"fidelity {name}", status, f"{gap:+.1f} pt, sign test p = {p_value:.2f}"))
        checks.append((f"speed    {name}", "PASS" if ratio <= SPEED_BUDGET else "FAIL", f"{ratio:.2f}x"))
    out("")
    out("=" * 100)
    out(f"checks (fidelity: robustlab - torchattacks <= +{FIDELITY_SLACK} points and every robustlab point inside "
        f"the threat model; speed: CPU time ratio <= {SPEED_BUDGET})")
    for name, status, value in checks:
        out(f"  {status:5s} {name}: {value}")
    out("(NOISE: above the budget, but the examples only torchattacks breaks do not outnumber those only robustlab")
    out(" breaks significantly (one-sided sign test p >= 0.05): a different random draw, not a weaker attack)")
    out(f"total wall time {wall:.0f} s, CPU time {time.process_time():.0f} s")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def rows(args: argparse.Namespace) -> list[Row]:
    steps, queries = args.steps, args.queries
    apgd = {"steps": steps}
    apgd_t = {"steps": steps, "n_target_classes": 9}
    out = [
        Row("mnist_pgd", "linf", 0.3, "0.3", "apgd-ce", args.n_mnist, apgd),
        Row("mnist_pgd", "linf", 0.3, "0.3", "apgd-dlr", args.n_mnist_dlr, apgd),
        Row("mnist_pgd", "linf", 0.3, "0.3", "apgd-t", args.n_mnist_targeted, apgd_t),
        Row("mnist_pgd", "linf", 0.3, "0.3", "square", args.n_mnist_square, {"queries": queries}),
        Row("cifar_std", "linf", 8 / 255, "8/255", "apgd-ce", args.n_cifar, apgd),
        Row("cifar_std", "linf", 8 / 255, "8/255", "apgd-t", args.n_cifar, apgd_t),
        Row("cifar_std", "linf", 8 / 255, "8/255", "square", args.n_cifar_square, {"queries": queries}),
    ]
    if not args.no_l2:
        out += [
            Row("mnist_pgd", "l2", 2.0, "2.0", "apgd-ce", args.n_mnist_l2, apgd),
            Row("mnist_pgd", "l2", 2.0, "2.0", "square", max(1, args.n_mnist_l2 // 4), {"queries": args.l2_queries}),
        ]
    if args.only:
        wanted = {a.strip() for a in args.only.split(",")}
        out = [r for r in out if r.attack in wanted or r.model_key in wanted]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-mnist", type=int, default=500, help="MNIST examples for apgd-ce")
    parser.add_argument("--n-mnist-dlr", type=int, default=300, help="MNIST examples for apgd-dlr")
    parser.add_argument("--n-mnist-targeted", type=int, default=80, help="MNIST examples for apgd-t")
    parser.add_argument("--n-mnist-square", type=int, default=50, help="MNIST examples for square (Linf)")
    parser.add_argument("--n-mnist-l2", type=int, default=100, help="MNIST examples for apgd-ce L2 (square L2: 1/4)")
    parser.add_argument("--n-cifar", type=int, default=100, help="CIFAR-10 examples for apgd-ce and apgd-t")
    parser.add_argument("--n-cifar-square", type=int, default=40, help="CIFAR-10 examples for square")
    parser.add_argument("--steps", type=int, default=100, help="APGD steps")
    parser.add_argument("--queries", type=int, default=5000, help="Square queries (Linf rows)")
    parser.add_argument("--l2-queries", type=int, default=1000, help="Square queries (L2 row)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-l2", action="store_true", help="skip the L2 rows")
    parser.add_argument("--only", default="", help="comma-separated attacks or model keys to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few examples, small budgets")
    parser.add_argument("--out", type=Path, default=RESULTS / "apgd_square_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_mnist = args.n_mnist_dlr = 100
        args.n_mnist_targeted, args.n_mnist_square, args.n_mnist_l2, args.n_cifar, args.n_cifar_square = 40, 30, 80, 30, 30
        args.steps, args.queries, args.l2_queries = 20, 300, 300
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    todo = rows(args)
    for key in sorted({r.model_key for r in todo}):
        get_model(key)  # train (first run only) before anything is timed
    results = []
    for i, row in enumerate(todo):
        log(f"== {row.threat_title}  {row.attack}")
        results.append(run_row(row, i, args.seed))
    report = format_report(results, args, time.perf_counter() - t0)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
