"""Minimum-norm attacks and FAB: robustlab against torchattacks and foolbox.

The claims under test:

- Minimum norm: on the same model, the same examples (the correctly classified ones among the first
  N test images) and the same budget, the perturbations found by robustlab's ``fab-min``,
  ``deepfool``, ``cw`` and ``ead`` are no larger than those of the peers' implementations of the
  same algorithm: the median over the attacked examples (a failure counts as an infinite distance)
  and the mean over the examples both tools break, each at most 0.1% above the peer's, and no fewer
  examples found.
- Fixed budget: robust accuracy under robustlab's ``fab`` and ``fab-t`` at eps is at most 0.5
  points above torchattacks' FAB and multi-targeted FAB with the same eps, steps and targets.
- Time: robustlab / peer wall time of the same run, printed (one timed run per tool, so the
  machine's noise, tens of percent on a shared one, is in it).

Peers: torchattacks FAB (untargeted with a huge eps, so it returns its smallest points; and
multi-targeted at eps), foolbox L2/LinfDeepFoolAttack, L2CarliniWagnerAttack and EADAttack with the
same parameters. References (``ref``), printed but not checked, run another variant: torchattacks'
DeepFool (overshoot per step) and CW (no binary search over c). The scenario notes say more.

A distance counts only if the returned point is misclassified by a fresh forward pass and lies in
the [0, 1] box; at a fixed eps the point must also lie in the ball (tolerance 1e-5).

Default sizes keep the run under ~10 minutes on 2 shared CPU cores; ``--scale`` multiplies the
number of examples of every scenario, ``--only`` picks scenarios by a substring of their title.

Usage: python benchmarks/minimum_norm_vs_peers.py [--scale 1.0] [--only fab-min] [--threads 1] [--seed 0]
The report is printed and written to benchmarks/results/minimum_norm_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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

NORM_SLACK = 1e-3  # relative: robustlab's median / mean distance may exceed a peer's by this much
ACC_SLACK = 0.5  # points of robust accuracy robustlab may lie above a peer
HUGE_EPS = 1e6  # torchattacks' FAB returns only points within its eps: make it return all

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scenario:
    """One comparison. kind: "min" (distances) or "fixed" (robust accuracy at eps)."""

    kind: str
    model_key: str
    attack: str  # robustlab registry name
    norm: str
    params: dict
    n: int  # first-n test examples (only the correctly classified ones are attacked)
    eps: float = 0.0
    eps_label: str = ""
    peers: dict[str, bool] = field(default_factory=dict)  # peer -> checked (same algorithm) or reference
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        budget = f" eps={self.eps_label}" if self.kind == "fixed" else ""
        return f"{self.model_key}  {self.attack} {self.norm}{budget}  ({params})"


# ---------------------------------------------------------------------- the contenders


def make_attacks(model: nn.Module, sc: Scenario, seed: int) -> dict[str, AttackFn]:
    """Each tool's attack for this scenario as a function (x, y) -> x_adv (built outside timing)."""
    import foolbox as fb
    import torchattacks

    p = sc.params
    threat = ThreatModel(sc.norm, sc.eps if sc.kind == "fixed" else 1.0)
    ours = create_attack(sc.attack, threat, **p)

    def run_robustlab(x, y):
        with robustlab_runtime(model, x):  # as an evaluation runs it
            return ours.run(model, x, y, make_generator(seed)).x_adv

    out: dict[str, AttackFn] = {"robustlab": run_robustlab}
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")

    def foolbox_fn(attack) -> AttackFn:
        def run(x, y):
            _, clipped, _ = attack(fmodel, x, y, epsilons=None)
            return clipped
        return run

    ta_norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[sc.norm]
    for peer in sc.peers:
        if peer == "torchattacks":
            if sc.attack.startswith("fab"):
                ta = torchattacks.FAB(
                    model, norm=ta_norm, eps=sc.eps if sc.kind == "fixed" else HUGE_EPS, steps=p["steps"],
                    n_restarts=p.get("restarts", 1), alpha_max=0.1, eta=1.05, beta=0.9, seed=seed,
                    multi_targeted=sc.attack.startswith("fab-t"), n_classes=p.get("n_target_classes", 9) + 1,
                )
            elif sc.attack == "deepfool":
                ta = torchattacks.DeepFool(model, steps=p.get("steps", 50), overshoot=p.get("overshoot", 0.02))
            elif sc.attack == "cw":
                ta = torchattacks.CW(model, c=1.0, kappa=0, steps=p["steps"], lr=p["lr"])
            elif sc.attack == "ead":
                ta = torchattacks.EADL1(
                    model, kappa=0, lr=p["lr"], binary_search_steps=p["binary_steps"], max_iterations=p["steps"],
                    abort_early=True, initial_const=p["initial_const"], beta=p["beta"],
                )
            out[peer] = (lambda a: (lambda x, y: a(x, y)))(ta)
        elif peer == "foolbox":
            if sc.attack == "deepfool":
                cls = fb.attacks.L2DeepFoolAttack if sc.norm == "l2" else fb.attacks.LinfDeepFoolAttack
                fa = cls(steps=p.get("steps", 50), candidates=p.get("candidates", 10),
                         overshoot=p.get("overshoot", 0.02), loss="logits")
            elif sc.attack == "cw":
                fa = fb.attacks.L2CarliniWagnerAttack(
                    binary_search_steps=p["binary_steps"], steps=p["steps"], stepsize=p["lr"], confidence=0.0,
                    initial_const=p["initial_const"], abort_early=True,
                )
            elif sc.attack == "ead":
                fa = fb.attacks.EADAttack(
                    binary_search_steps=p["binary_steps"], steps=p["steps"], initial_stepsize=p["lr"], confidence=0.0,
                    initial_const=p["initial_const"], regularization=p["beta"], decision_rule="L1", abort_early=True,
                )
            else:
                raise ValueError(f"no foolbox peer for {sc.attack}")
            out[peer] = foolbox_fn(fa)
    return out


# ---------------------------------------------------------------------- one scenario


def run_scenario(sc: Scenario, seed: int) -> dict:
    model, card = get_model(sc.model_key)
    x_all, y_all = load_split(card["dataset"], "test")
    x, y = x_all[: sc.n].contiguous(), y_all[: sc.n].contiguous()
    correct = predict(model, x) == y
    x, y = x[correct].contiguous(), y[correct].contiguous()
    threat = ThreatModel(sc.norm, sc.eps if sc.kind == "fixed" else 1.0)
    attacks = make_attacks(model, sc, seed)
    tools = {}
    for i, (tool, fn) in enumerate(attacks.items()):
        log(f"  {tool}: {len(y)} examples ...")
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        x_adv = fn(x, y).detach().to(x.dtype)
        seconds = time.perf_counter() - t0
        in_box = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
        wrong = (predict(model, x_adv) != y) & in_box
        dist = threat.distance(x_adv, x)
        found = torch.where(wrong, dist, torch.full_like(dist, math.inf))
        entry = {"dist": found, "seconds": seconds, "in_box": float(in_box.float().mean())}
        if sc.kind == "fixed":
            inside = threat.contains(x_adv, x, tol=1e-5)
            entry["robust_acc"] = 1.0 - float((wrong & inside).float().mean())
            entry["outside"] = int((wrong & ~inside).sum())
        tools[tool] = entry
    return {"scenario": sc, "clean": float(correct.float().mean()), "n_attacked": len(y), "tools": tools,
            "card": card}


# ---------------------------------------------------------------------- report


def _median(d: torch.Tensor) -> float:
    return float(d.sort().values[(len(d) - 1) // 2]) if len(d) else math.nan


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab minimum-norm attacks and FAB vs torchattacks / foolbox: found norms, robust accuracy, time")
    out("=" * 100)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/minimum_norm_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; each tool runs once per scenario on the same examples (the correctly classified "
        "ones among the first n); time = that run")
    out("distances count only for points misclassified by a fresh forward pass and inside [0, 1]; "
        "median over all attacked examples (failure = inf), mean* over the examples both tools break")
    checks: list[tuple[str, bool, str]] = []
    for r in results:
        sc: Scenario = r["scenario"]
        tools = r["tools"]
        out("")
        out("-" * 100)
        out(sc.title)
        out(f"  {r['n_attacked']} examples attacked (clean accuracy {100 * r['clean']:.1f}% on the first {sc.n})")
        ours = tools["robustlab"]
        if sc.kind == "min":
            out(f"  {'tool':20s} {'found':>7s} {'median':>9s} {'mean*':>9s} {'rl mean*':>9s} {'rl<=tool':>9s} "
                f"{'time (s)':>9s} {'rl/tool':>8s}")
            mine = ours["dist"]
            for tool, t in tools.items():
                d = t["dist"]
                row = f"  {tool if tool == 'robustlab' else tool + ('' if sc.peers[tool] else ' (ref)'):20s} " \
                      f"{100 * float(d.isfinite().float().mean()):6.1f}% {_median(d):9.4f}"
                if tool == "robustlab":
                    out(f"{row} {'':>9s} {'':>9s} {'':>9s} {t['seconds']:9.2f}")
                    continue
                both = mine.isfinite() & d.isfinite()
                mean_t = float(d[both].mean()) if bool(both.any()) else math.nan
                mean_r = float(mine[both].mean()) if bool(both.any()) else math.nan
                le = 100 * float((mine <= d * (1 + NORM_SLACK)).float().mean())  # inf <= inf counts
                out(f"{row} {mean_t:9.4f} {mean_r:9.4f} {le:8.0f}% {t['seconds']:9.2f} "
                    f"{ours['seconds'] / t['seconds']:8.2f}")
                if sc.peers[tool]:
                    ok = (_median(mine) <= _median(d) * (1 + NORM_SLACK) and mean_r <= mean_t * (1 + NORM_SLACK)
                          and int(mine.isfinite().sum()) >= int(d.isfinite().sum()))
                    checks.append((f"norms vs {tool:12s} {sc.title}", ok,
                                   f"median {_median(mine):.4f} vs {_median(d):.4f}, mean* {mean_r:.4f} vs "
                                   f"{mean_t:.4f}, found {int(mine.isfinite().sum())} vs {int(d.isfinite().sum())}"))
            out("  * mean over the examples both robustlab and that tool break; rl<=tool: share of examples where "
                "robustlab's distance is no larger")
            for note in sc.notes:
                out(f"  note: {note}")
        else:
            out(f"  {'tool':20s} {'robust acc':>10s} {'rl - tool':>10s} {'time (s)':>9s} {'rl/tool':>8s}")
            for tool, t in tools.items():
                diff = "" if tool == "robustlab" else f"{100 * (ours['robust_acc'] - t['robust_acc']):+10.1f}"
                ratio = "" if tool == "robustlab" else f"{ours['seconds'] / t['seconds']:8.2f}"
                extra = f"  ({t['outside']} misclassified points outside the ball not counted)" if t["outside"] else ""
                out(f"  {tool:20s} {100 * t['robust_acc']:9.1f}% {diff:>10s} {t['seconds']:9.2f} {ratio:>8s}{extra}")
            for tool, checked in sc.peers.items():
                if checked:
                    gap = 100 * (ours["robust_acc"] - tools[tool]["robust_acc"])
                    checks.append((f"accuracy vs {tool:12s} {sc.title}", gap <= ACC_SLACK, f"{gap:+.1f} pt"))
    out("")
    out("=" * 100)
    out("time ratios (robustlab / peer, same run)")
    for r in results:
        sc, tools = r["scenario"], r["tools"]
        ratios = ", ".join(f"{tool} {tools['robustlab']['seconds'] / t['seconds']:.2f}"
                           for tool, t in tools.items() if tool != "robustlab")
        out(f"  {sc.title}: {ratios}")
    out("")
    out("checks")
    for name, ok, value in checks:
        out(f"  {'PASS' if ok else 'FAIL'}  {name}: {value}")
    out(f"total wall time {wall:.0f} s")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def scenarios(scale: float) -> list[Scenario]:
    def n(base: int) -> int:
        return max(4, int(round(base * scale)))

    fab = {"steps": 100}
    cw = {"steps": 100, "binary_steps": 9, "lr": 0.01, "initial_const": 1e-3}
    ead = {"steps": 100, "binary_steps": 9, "lr": 0.01, "initial_const": 1e-3, "beta": 1e-3}
    ta, fb, fb_ta_ref = {"torchattacks": True}, {"foolbox": True}, {"foolbox": True, "torchattacks": False}
    ta_deepfool = ("torchattacks' DeepFool applies the overshoot to each step from the current iterate, not to "
                   "the accumulated perturbation as the paper's code and foolbox do: another variant, not checked")
    return [
        Scenario("min", "mnist_std", "fab-min", "linf", fab, n(16), peers=ta),
        Scenario("min", "mnist_std", "fab-min", "l2", fab, n(16), peers=ta),
        Scenario("min", "mnist_std", "deepfool", "l2", {"steps": 50}, n(40), peers=fb_ta_ref, notes=[ta_deepfool]),
        Scenario("min", "mnist_std", "deepfool", "linf", {"steps": 50}, n(40), peers=fb),
        Scenario("min", "cifar_std", "deepfool", "l2", {"steps": 50}, n(40), peers=fb_ta_ref, notes=[ta_deepfool]),
        Scenario("min", "cifar_std", "cw", "l2", cw, n(12), peers=fb_ta_ref,
                 notes=["torchattacks' CW has no binary search over c (c = 1 here, the same Adam steps): "
                        "a reference, not checked",
                        "on MNIST, 100 Adam steps of 0.01 in tanh space cannot move the many pixels at 0 or 1 "
                        "(CW's known weakness there); foolbox then returns its all-zero initial point, which "
                        "a misclassification check counts: hence CIFAR-10 here"]),
        Scenario("min", "mnist_std", "ead", "l1", ead, n(10), peers=fb,
                 notes=["torchattacks' EADL1 is left out: with these settings it returned no misclassified "
                        "point on any example in our trial runs"]),
        Scenario("fixed", "mnist_pgd", "fab", "linf", {"steps": 50}, n(60), 0.3, "0.3", peers=ta),
        Scenario("fixed", "mnist_pgd", "fab-t", "linf", {"steps": 50, "n_target_classes": 9}, n(60), 0.3, "0.3",
                 peers=ta),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every scenario's number of examples")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching scenarios")
    parser.add_argument("--quick", action="store_true", help="a smoke run (--scale 0.2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "minimum_norm_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale = 0.2
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    for key in ("mnist_std", "mnist_pgd", "cifar_std"):
        get_model(key)  # train (first run only) before anything is timed
    results = []
    wanted = [s for s in args.only.split(",") if s]
    for sc in scenarios(args.scale):
        if wanted and not any(w in sc.title for w in wanted):
            continue
        log(f"== {sc.title}")
        results.append(run_scenario(sc, args.seed))
    report = format_report(results, args, time.perf_counter() - t0)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
