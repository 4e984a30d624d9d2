"""Margin attacks at equal gradient budget: robustlab's MM (minimum-margin) and MD / MD-MT
(margin-decomposition) against torchattacks' APGD-DLR, APGD-T and PGD on the CW margin.

The claim under test (the margin-attacks issue): on a model where robust accuracy is far from 0 (the
PGD-trained MNIST model ``mnist_pgd``, Linf eps 0.3), each of ``mm``, ``md`` and ``md-mt`` is at least
as strong as the strongest of the peers given the same number of input gradients per example: its
robust accuracy is at most SLACK points above the lowest peer's. CPU time is reported next to it.

Budgets (one row each, ``--rows BxK``): B input gradients per example, K target classes for the
targeted attacks. The defaults are the published MM presets: 60 x 3 (MM3: 3 targets x 20 steps) and
180 x 9 (MM9: 9 targets x 20 steps). At budget B with K targets:

- robustlab ``mm``: K targets x B/K steps (APGD steps on ``z_t - z_y``);
- robustlab ``md``: 2 restarts x B/2 steps (one per decomposed term, then the margin);
- robustlab ``md-mt``: T targets x 2 restarts x B/(2T) steps, with T the most targets (at most K)
  that leave 30 steps per run (``MD_MT_RUN``): MD's two stages need room (split into 2K runs of 10
  steps, at 180 x 9, MD-MT left 40.5% robust where APGD-T left 37.0%);
- torchattacks ``APGD(loss='dlr')``: B steps;
- torchattacks ``APGDT``: K targets x B/K steps (``n_classes=K+1``);
- torchattacks ``UPGD(loss='margin', decay=0, random_start=True)``: PGD on the CW margin, B steps of
  ``2.5 * eps / B`` (Madry's rule). torchattacks has no other PGD with a margin loss (its ``CW`` is the
  L2 optimization attack).

robustlab stops attacking an example as soon as it is misclassified, so it spends fewer gradients on
average (shown as fwd/grad per example); no attack ever spends more than B per example (checked for
robustlab from its per-sample counts).

Robust accuracy is measured the same way for every contender: a fresh forward pass on the returned
batch; the returned points are checked to lie in the threat model (tolerance 1e-5). All contenders see
the model through the same thin wrapper that counts the images it is given. Timing: process CPU time
(one intra-op thread), wall time in brackets; one run per contender on all N examples, the contenders'
order reversed on every other row.

Cost: the default run (N=200 examples, two rows) takes about 4 minutes of CPU on one core once the
model is cached (training ``mnist_pgd`` on first use adds a few minutes). N is small, so one example is
0.5 points: the report gives the examples only the robustlab attack breaks / only the strongest peer
breaks; raise ``--n`` for tighter numbers.

Usage: python benchmarks/margin_attacks_vs_peers.py [--n 200] [--rows 60x3,180x9] [--seed 0]
The report is printed and written to benchmarks/results/margin_attacks_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    Counter,
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

SLACK = 1.0  # points of robust accuracy a robustlab margin attack may lie above the strongest peer
MD_MT_RUN = 30  # the fewest steps per MD-MT run (stage 1 + stage 2) the budget is split into
MODEL, NORM, EPS, EPS_LABEL = "mnist_pgd", "linf", 0.3, "0.3"
OURS = ("mm", "md", "md-mt")
PEERS = ("ta APGD-DLR", "ta APGD-T", "ta PGD-CW")


@dataclass(frozen=True)
class Row:
    """A budget: ``budget`` input gradients per example, ``targets`` target classes."""

    budget: int
    targets: int

    @property
    def title(self) -> str:
        return f"budget {self.budget} gradients per example, {self.targets} target classes"


# ---------------------------------------------------------------------- the contenders


Run = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def contenders(model: nn.Module, row: Row, seed: int) -> dict[str, tuple[str, Run]]:
    """{label: (configuration, run(x, y) -> (x_adv, per-sample gradients or None))}, built untimed."""
    import torchattacks

    b, k = row.budget, row.targets
    threat = ThreatModel(NORM, EPS)
    t = max(1, min(k, b // (2 * MD_MT_RUN)))
    ours = {
        "mm": {"targets": k, "steps": b // k},
        "md": {"restarts": 2, "steps": b // 2},
        "md-mt": {"n_target_classes": t, "restarts": 2, "steps": b // (2 * t)},
    }
    out: dict[str, tuple[str, Run]] = {}
    for name, params in ours.items():
        attack = create_attack(name, threat, **params)

        def run(x, y, attack=attack):
            with robustlab_runtime(model, x):  # as an evaluation runs it
                result = attack.run(model, x, y, make_generator(seed, 0))
            return result.x_adv, result.gradients

        out[name] = (", ".join(f"{key}={v}" for key, v in params.items()), run)

    dlr = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=b, n_restarts=1, seed=seed, loss="dlr", eot_iter=1,
                            rho=0.75)
    apgdt = torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=b // k, n_restarts=1, seed=seed, eot_iter=1,
                               rho=0.75, n_classes=k + 1)  # attacks n_classes - 1 targets
    alpha = 2.5 * EPS / b
    pgd_cw = torchattacks.UPGD(model, eps=EPS, alpha=alpha, steps=b, random_start=True, loss="margin", decay=0.0)

    def run_pgd_cw(x, y):
        torch.manual_seed(seed)  # UPGD draws its random start from the global generator
        return pgd_cw(x, y), None

    out["ta APGD-DLR"] = (f"steps={b}", lambda x, y: (dlr(x, y), None))
    out["ta APGD-T"] = (f"targets={k}, steps={b // k}", lambda x, y: (apgdt(x, y), None))
    out["ta PGD-CW"] = (f"steps={b}, alpha={alpha:.4g}, random start", run_pgd_cw)
    return out


# ---------------------------------------------------------------------- one row


def run_row(row: Row, index: int, n: int, seed: int) -> dict:
    model, card = get_model(MODEL)
    counter = Counter(model).eval()
    x_all, y_all = load_split(card["dataset"], "test")
    x, y = x_all[:n].contiguous(), y_all[:n].contiguous()
    threat = ThreatModel(NORM, EPS)
    clean = predict(model, x) == y
    runs = contenders(counter, row, seed)
    order = list(runs) if index % 2 == 0 else list(runs)[::-1]
    out: dict[str, dict] = {}
    for label in order:
        config, run = runs[label]
        log(f"  {label} ({config}) on {n} examples ...")
        counter.images = counter.grad_images = 0
        c0, w0 = time.process_time(), time.perf_counter()
        x_adv, grads = run(x, y)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        x_adv = x_adv.detach().to(x.dtype)
        robust = (predict(model, x_adv) == y) & clean
        out[label] = {
            "config": config,
            "robust": robust,
            "robust_acc": float(robust.float().mean()),
            "valid": float(threat.contains(x_adv, x, tol=1e-5).float().mean()),
            "cpu": cpu,
            "wall": wall,
            "images": counter.images,
            "grad_images": counter.grad_images,
            "max_grads": int(grads.max()) if grads is not None else None,
        }
        log(f"    robust accuracy {100 * out[label]['robust_acc']:.1f}%, {cpu:.1f} s CPU, {wall:.1f} s wall")
    return {"row": row, "clean": float(clean.float().mean()), "card": card, "results": out, "n": n}


# ---------------------------------------------------------------------- report


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab margin attacks (MM, MD, MD-MT) vs torchattacks at equal gradient budget")
    out("=" * 100)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/margin_attacks_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; one run per contender on the first {args.n} MNIST test examples; time = CPU seconds of "
        "this process (one thread; wall seconds in brackets: the machine may be shared)")
    out("robust acc: fresh forward pass on the returned points (clean errors count as broken); only: examples left "
        "robust by this attack only / by the strongest peer only")
    out("fwd/grad: images the model was given per example (all / with an input gradient); max: most input gradients "
        "one example got (robustlab's own per-sample count)")
    card, rec = results[0]["card"], results[0]["card"]["training"]["recipe"]
    out("")
    out(f"model: {MODEL} ({card['architecture']}, PGD-AT linf eps={rec['adversarial']['eps']} "
        f"steps={rec['adversarial']['steps']} from {rec['init']}; clean test acc "
        f"{100 * card['clean_accuracy']:.2f}% on the full test split), threat model {NORM} eps={EPS_LABEL}")
    checks: list[tuple[str, bool, str]] = []
    for r in results:
        row: Row = r["row"]
        res = r["results"]
        n = r["n"]
        best_peer = min(PEERS, key=lambda p: res[p]["robust_acc"])
        out("")
        out("-" * 100)
        out(f"{row.title}; N={n}, clean {100 * r['clean']:.1f}%")
        out(f"  {'contender':12s} {'configuration':42s} {'robust':>7s} {'only':>6s} {'CPU s':>7s} {'(wall)':>7s} "
            f"{'fwd/grad':>9s} {'max':>4s}")
        for label in (*OURS, *PEERS):
            d = res[label]
            only = "" if label == best_peer else (
                f"{int((d['robust'] & ~res[best_peer]['robust']).sum())}/"
                f"{int((res[best_peer]['robust'] & ~d['robust']).sum())}")
            tool = "rl " + label if label in OURS else label
            mark = " *" if label == best_peer else ""
            work = f"{d['images'] / n:.0f}/{d['grad_images'] / n:.0f}"
            mx = str(d["max_grads"]) if d["max_grads"] is not None else "-"
            out(f"  {tool:12s} {d['config']:42s} {100 * d['robust_acc']:6.1f}% {only:>6s} {d['cpu']:7.1f} "
                f"({d['wall']:5.0f}) {work:>9s} {mx:>4s}{mark}")
            if d["valid"] < 1.0:
                out(f"    outside the threat model (tol 1e-5): {100 * (1 - d['valid']):.1f}% of the points")
        out("  (* the strongest peer at this budget)")
        for label in OURS:
            d = res[label]
            gap = 100 * (d["robust_acc"] - res[best_peer]["robust_acc"])
            ok = gap <= SLACK and d["valid"] == 1.0 and (d["max_grads"] or 0) <= row.budget
            ratio = d["cpu"] / max(res[best_peer]["cpu"], 1e-9)
            checks.append((f"{label:6s} {row.title}", ok,
                           f"{gap:+.1f} pt vs {best_peer}; CPU {ratio:.2f}x of it"))
    out("")
    out("=" * 100)
    out(f"checks (robustlab attack's robust accuracy - strongest peer's <= +{SLACK} points, every point inside the "
        "threat model, no example over the budget)")
    for name, ok, value in checks:
        out(f"  {'PASS' if ok else 'FAIL'}  {name}: {value}")
    out(f"total wall time {wall:.0f} s, CPU time {time.process_time():.0f} s")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def parse_rows(text: str) -> list[Row]:
    rows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, _, k = part.partition("x")
        row = Row(int(b), int(k))
        if row.targets < 1 or row.budget % (2 * row.targets):
            raise SystemExit(f"row {part!r}: the budget must be a multiple of 2 x targets")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="MNIST test examples (the first N)")
    parser.add_argument("--rows", default="60x3,180x9", help="budgets: BxK, comma-separated (B gradients, K targets)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50 examples, budget 60 only")
    parser.add_argument("--out", type=Path, default=RESULTS / "margin_attacks_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.rows = 50, "60x3"
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    get_model(MODEL)  # train (first run only) before anything is timed
    results: list[dict[str, Any]] = []
    for i, row in enumerate(parse_rows(args.rows)):
        log(f"== {row.title}")
        results.append(run_row(row, i, args.n, args.seed))
    report = format_report(results, args, time.perf_counter() - t0)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
