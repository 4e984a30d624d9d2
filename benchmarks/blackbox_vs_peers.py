"""Black-box attacks: robustlab against ART, foolbox and torchattacks at the same query budget.

- Decision-based: robustlab ``hopskipjump`` against ART's ``HopSkipJump`` and foolbox's
  ``HopSkipJumpAttack`` (L2 and Linf). A peer runs a fixed number of iterations; every image it sends to
  the model is counted by a wrapper, and robustlab then runs with ``queries`` set to that peer's mean
  count per sample (robustlab never exceeds its budget on any sample). Compared: the median
  perturbation norm found, the fraction of points broken within a fixed eps, and time.
- Score-based: robustlab ``spsa`` and ``nes`` against torchattacks' ``SPSA`` (ART and foolbox have no
  SPSA or NES) at the same steps and pairs per step: robust accuracy, queries spent per sample (robustlab
  stops querying a sample once it is misclassified; torchattacks spends its full budget), time.

Every tool gets the same model (eval mode) and the same examples: the first N test points the model
classifies correctly. Success is judged for all tools the same way: a fresh forward pass on the
returned batch, plus the distance to the clean image. Times are single runs (these attacks take too
long for interleaved repeats), on the same machine, one after another.

Usage: python benchmarks/blackbox_vs_peers.py [--n-mnist 20] [--n-cifar 10] [--quick]
The report is printed and written to benchmarks/results/blackbox_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    environment,
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


class CountingModel(nn.Module):
    """The model, counting every image it is asked about (the queries)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.model(x.float())  # ART hands over float64 arrays in places


@dataclass
class Outcome:
    tool: str
    queries: float  # mean per sample
    max_queries: float
    seconds: float
    x_adv: torch.Tensor


def _first_correct(model: nn.Module, dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split(dataset, "test")
    x, y = x[: 4 * n + 50], y[: 4 * n + 50]
    keep = (predict(model, x) == y).nonzero(as_tuple=True)[0][:n]
    return x[keep].contiguous(), y[keep].contiguous()


def _timed(tool: str, counting: CountingModel, n: int, fn: Callable[[], torch.Tensor], per_sample=None) -> Outcome:
    counting.images = 0
    t0 = time.perf_counter()
    x_adv = fn().detach().float().cpu()
    seconds = time.perf_counter() - t0
    if per_sample is not None:
        q = per_sample()
        return Outcome(tool, float(q.float().mean()), float(q.max()), seconds, x_adv)
    return Outcome(tool, counting.images / n, float("nan"), seconds, x_adv)


# ---------------------------------------------------------------------- HopSkipJump


@dataclass
class HSJScenario:
    model_key: str
    norm: str
    eps: float
    eps_label: str
    n: int
    iterations: int  # the peers' iterations (their query budget follows)
    peers: tuple[str, ...] = ("art", "foolbox")

    @property
    def title(self) -> str:
        return f"HopSkipJump  {self.model_key}  {self.norm}  success at eps={self.eps_label}"


def run_hsj(sc: HSJScenario, seed: int) -> dict:
    from art.attacks.evasion import HopSkipJump as ArtHSJ
    from art.estimators.classification import PyTorchClassifier

    model, card = get_model(sc.model_key)
    x, y = _first_correct(model, card["dataset"], sc.n)
    counting = CountingModel(model).eval()
    n = len(y)
    outcomes: list[Outcome] = []

    for peer in sc.peers:
        log(f"  {peer}: {sc.iterations} iterations on {n} points ...")
        np.random.seed(seed)
        torch.manual_seed(seed)
        if peer == "art":
            classifier = PyTorchClassifier(
                model=counting, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                clip_values=(0.0, 1.0), device_type="cpu",
            )
            attack = ArtHSJ(classifier, batch_size=128, norm=2 if sc.norm == "l2" else np.inf, max_iter=sc.iterations,
                            max_eval=10000, init_eval=100, init_size=100, verbose=False)
            fn = lambda: torch.from_numpy(attack.generate(x.numpy(), y=None))  # noqa: E731
        else:
            import foolbox as fb

            fmodel = fb.PyTorchModel(counting, bounds=(0.0, 1.0), device="cpu")
            attack = fb.attacks.HopSkipJumpAttack(steps=sc.iterations, initial_gradient_eval_steps=100,
                                                  max_gradient_eval_steps=10000, gamma=1.0, constraint=sc.norm)
            fn = lambda: attack.run(fmodel, x, fb.criteria.Misclassification(y))  # noqa: E731
        outcomes.append(_timed(peer, counting, n, fn))
        # robustlab with that peer's mean budget per sample.
        budget = max(1, int(round(outcomes[-1].queries)))
        log(f"  robustlab: {budget} queries per sample ...")
        ours = create_attack("hopskipjump", ThreatModel(sc.norm, sc.eps), queries=budget)
        holder: dict = {}

        def run_ours() -> torch.Tensor:
            with robustlab_runtime(model, x):  # probed on the inner model: the probe is not a counted query
                holder["r"] = ours.run(counting, x, y, make_generator(seed))
            return holder["r"].x_adv

        outcomes.append(_timed(f"robustlab @ {peer} budget", counting, n, run_ours, lambda: holder["r"].forwards))
        if counting.images != int(holder["r"].forwards.sum()):
            raise AssertionError("robustlab's query count differs from what the model saw")

    threat = ThreatModel(sc.norm, sc.eps)
    rows = []
    for o in outcomes:
        wrong = predict(model, o.x_adv) != y
        dist = threat.distance(o.x_adv, x)
        found = dist[wrong]
        rows.append({
            "tool": o.tool, "queries": o.queries, "max_queries": o.max_queries, "seconds": o.seconds,
            "found": float(wrong.float().mean()),
            "median": float(found.median()) if len(found) else float("nan"),
            # A point not broken counts as infinitely far for the median over all points.
            "median_all": float(torch.where(wrong, dist, torch.full_like(dist, float("inf"))).median()),
            "success": float((wrong & (dist <= sc.eps + 1e-6)).float().mean()),
            "in_box": bool(((o.x_adv >= 0) & (o.x_adv <= 1)).all()),
        })
    return {"scenario": sc, "n": n, "card": card, "rows": rows}


# ---------------------------------------------------------------------- SPSA / NES


@dataclass
class ScoreScenario:
    model_key: str
    eps: float
    eps_label: str
    n: int
    steps: int
    samples: int  # antithetic pairs per step
    lr: float  # SPSA's Adam learning rate (both SPSAs)

    @property
    def title(self) -> str:
        return (f"SPSA / NES  {self.model_key}  linf eps={self.eps_label}  {self.steps} steps x {self.samples} "
                f"pairs")


def run_score(sc: ScoreScenario, seed: int) -> dict:
    import torchattacks

    model, card = get_model(sc.model_key)
    x, y = _first_correct(model, card["dataset"], sc.n)
    counting = CountingModel(model).eval()
    n = len(y)
    threat = ThreatModel("linf", sc.eps)
    outcomes: list[Outcome] = []
    for name in ("spsa", "nes"):
        log(f"  robustlab {name} on {n} points ...")
        extra = {"lr": sc.lr} if name == "spsa" else {}
        attack = create_attack(name, threat, steps=sc.steps, samples=sc.samples, **extra)
        holder: dict = {}

        def run_ours(attack=attack, holder=holder) -> torch.Tensor:
            with robustlab_runtime(model, x):  # probed on the inner model: the probe is not a counted query
                holder["r"] = attack.run(counting, x, y, make_generator(seed))
            return holder["r"].x_adv

        outcomes.append(_timed(f"robustlab {name}", counting, n, run_ours, lambda holder=holder: holder["r"].forwards))
    log(f"  torchattacks SPSA on {n} points ...")
    ta = torchattacks.SPSA(counting, eps=sc.eps, delta=0.01, lr=sc.lr, nb_iter=sc.steps, nb_sample=sc.samples,
                           max_batch_size=sc.samples)

    def run_ta() -> torch.Tensor:
        torch.manual_seed(seed)
        return ta(x, y)

    outcomes.append(_timed("torchattacks SPSA", counting, n, run_ta))
    rows = []
    for o in outcomes:
        rows.append({
            "tool": o.tool, "queries": o.queries, "max_queries": o.max_queries, "seconds": o.seconds,
            "robust": float((predict(model, o.x_adv) == y).float().mean()),
            "in_ball": float(threat.contains(o.x_adv, x, tol=1e-5).float().mean()),
        })
    return {"scenario": sc, "n": n, "card": card, "rows": rows}


# ---------------------------------------------------------------------- report


def format_report(hsj: list[dict], score: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab black-box attacks vs ART / foolbox / torchattacks at equal query budgets")
    out("=" * 86)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/blackbox_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; examples: the first N test points each model classifies correctly; times are single "
        "runs, one tool after another")
    seen = set()
    for r in hsj + score:
        key, card = r["scenario"].model_key, r["card"]
        if key not in seen:
            seen.add(key)
            out(f"  {key}: {card['architecture']}, clean test accuracy {100 * card['clean_accuracy']:.2f}%")
    for r in hsj:
        sc: HSJScenario = r["scenario"]
        out("")
        out("-" * 86)
        out(f"{sc.title}  (n={r['n']}; peers run {sc.iterations} iterations, robustlab gets each peer's mean "
            "queries)")
        out(f"  {'tool':28s} {'queries/pt':>10s} {'max':>6s} {'found':>6s} {'median ' + sc.norm:>10s} "
            f"{'success':>8s} {'time (s)':>9s}")
        for row in r["rows"]:
            mx = "" if np.isnan(row["max_queries"]) else f"{row['max_queries']:.0f}"
            out(f"  {row['tool']:28s} {row['queries']:10.0f} {mx:>6s} {100 * row['found']:5.0f}% "
                f"{row['median_all']:10.4f} {100 * row['success']:7.1f}% {row['seconds']:9.1f}"
                + ("" if row["in_box"] else "  (outside [0, 1]!)"))
        by = {row["tool"]: row for row in r["rows"]}
        for peer in sc.peers:
            a, b = by[f"robustlab @ {peer} budget"], by[peer]
            out(f"  robustlab / {peer}: median norm x{a['median_all'] / b['median_all']:.2f}, success "
                f"{100 * (a['success'] - b['success']):+.1f} points, time x{a['seconds'] / b['seconds']:.2f}")
    for r in score:
        sc: ScoreScenario = r["scenario"]
        out("")
        out("-" * 86)
        out(f"{sc.title}  (n={r['n']}; Adam lr {sc.lr:g} and delta 0.01 for both SPSAs; NES sigma 0.001, "
            "step eps/10)")
        out(f"  {'tool':28s} {'queries/pt':>10s} {'max':>6s} {'robust acc':>10s} {'in ball':>8s} {'time (s)':>9s}")
        for row in r["rows"]:
            mx = "" if np.isnan(row["max_queries"]) else f"{row['max_queries']:.0f}"
            out(f"  {row['tool']:28s} {row['queries']:10.0f} {mx:>6s} {100 * row['robust']:9.1f}% "
                f"{100 * row['in_ball']:7.1f}% {row['seconds']:9.1f}")
    out("")
    out(f"total wall time {wall:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-mnist", type=int, default=20, help="MNIST points per comparison")
    parser.add_argument("--n-cifar", type=int, default=10, help="CIFAR-10 points per comparison")
    parser.add_argument("--iterations", type=int, default=5, help="the peers' HopSkipJump iterations")
    parser.add_argument("--spsa-steps", type=int, default=20)
    parser.add_argument("--spsa-samples", type=int, default=32, help="antithetic pairs per step")
    parser.add_argument("--spsa-lr", type=float, default=0.03, help="SPSA's Adam learning rate (pixels)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few points, fewer iterations")
    parser.add_argument("--out", type=Path, default=RESULTS / "blackbox_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_mnist, args.n_cifar, args.iterations, args.spsa_steps = 5, 3, 3, 6
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    for key in ("mnist_std", "cifar_std"):
        get_model(key)  # train (first run only) before anything is timed
    hsj_scenarios = [
        HSJScenario("mnist_std", "l2", 2.0, "2.0", args.n_mnist, args.iterations),
        HSJScenario("mnist_std", "linf", 0.3, "0.3", args.n_mnist, args.iterations),
        HSJScenario("cifar_std", "l2", 0.5, "0.5", args.n_cifar, args.iterations, peers=("art",)),
    ]
    score_scenarios = [ScoreScenario("mnist_std", 0.3, "0.3", args.n_mnist, args.spsa_steps, args.spsa_samples,
                                     args.spsa_lr)]
    hsj, score = [], []
    for sc in hsj_scenarios:
        log(f"== {sc.title}")
        hsj.append(run_hsj(sc, args.seed))
    for sc in score_scenarios:
        log(f"== {sc.title}")
        score.append(run_score(sc, args.seed))
    report = format_report(hsj, score, args, time.perf_counter() - t0)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
