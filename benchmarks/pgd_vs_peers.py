"""PGD fidelity and speed: robustlab against torchattacks, ART and foolbox.

The claim under test (from the issue):

- Fidelity: on the same model and the same examples, at equal steps and step size, robustlab's PGD is
  never weaker than torchattacks' and ART's (or foolbox's): its robust accuracy is at most 0.5 points
  above theirs. Shown on an MNIST model (standard and PGD-trained) and a CIFAR-10 model.
- Speed: a k-step PGD costs at most 1.15x the time of k forward+backward passes over the same batch
  (the physical floor), and is not slower than the fastest peer on the same batch.

Every tool gets the same model (eval mode), the same first-N test examples, eps, step size, number of
steps and a random start. Robust accuracy is measured the same way for all: a fresh forward pass on the
returned batch; the returned points are also checked to lie in the threat model.

robustlab's PGD stops attacking a sample once it is misclassified and keeps that first success, so it
spends less time than the floor on models that break easily. To keep the floor ratio honest the run
also times every tool on a batch of points that survive the attack on the PGD-trained model, where
(almost) nothing stops early.

Usage: python benchmarks/pgd_vs_peers.py [--n-mnist 1000] [--n-cifar 500] [--threads 1] [--quick]
The report is printed and written to benchmarks/results/pgd_vs_peers.txt.
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
    input_gradient_floor,
    load_split,
    log,
    predict,
    set_threads,
    time_interleaved,
)
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.seeding import make_generator  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

FIDELITY_SLACK = 0.5  # points of robust accuracy robustlab may lie above a peer
FLOOR_BUDGET = 1.15  # robustlab time / (k x forward+backward)
PEER_BUDGET = 1.0  # robustlab time / fastest peer

PEERS = ("torchattacks", "art", "foolbox")
TOOLS = ("robustlab",) + PEERS

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scenario:
    """One comparison: a model, a threat model, PGD settings and the examples."""

    model_key: str
    norm: str  # linf | l2
    eps: float
    alpha: float
    steps: int
    n: int  # first-n test examples for robust accuracy
    time_batch: int  # first-b examples for the interleaved timing
    eps_label: str
    no_early_stop_batch: int = 0  # >0: also time on this many points that survive the attack

    @property
    def title(self) -> str:
        return f"{self.model_key}  {self.norm} eps={self.eps_label}  alpha={self.alpha:.4g}  steps={self.steps}"


# ---------------------------------------------------------------------- the contenders


def make_attacks(model: nn.Module, sc: Scenario, shape: tuple[int, ...], seed: int) -> dict[str, AttackFn]:
    """Each tool's PGD for this scenario as a function (x, y) -> x_adv; wrappers are built here,
    outside any timed region. Seeds are reset inside so every call draws the same random start."""
    import foolbox as fb
    import torchattacks
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    threat = ThreatModel(sc.norm, sc.eps)
    ours = create_attack("pgd", threat, steps=sc.steps, alpha=sc.alpha, random_start=True, loss="ce")

    def run_robustlab(x, y):
        return ours.run(model, x, y, make_generator(seed)).x_adv

    ta_cls = torchattacks.PGD if sc.norm == "linf" else torchattacks.PGDL2
    ta = ta_cls(model, eps=sc.eps, alpha=sc.alpha, steps=sc.steps, random_start=True)

    def run_torchattacks(x, y):
        torch.manual_seed(seed)
        return ta(x, y)

    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(shape[1:]), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="cpu",
    )

    def run_art(x, y):
        np.random.seed(seed)
        torch.manual_seed(seed)
        art_attack = ProjectedGradientDescentPyTorch(
            classifier, norm=np.inf if sc.norm == "linf" else 2, eps=sc.eps, eps_step=sc.alpha,
            max_iter=sc.steps, num_random_init=1, batch_size=len(x), verbose=False,
        )
        return torch.from_numpy(art_attack.generate(x.numpy(), y=y.numpy()))

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    fb_cls = fb.attacks.LinfPGD if sc.norm == "linf" else fb.attacks.L2PGD
    fb_attack = fb_cls(abs_stepsize=sc.alpha, steps=sc.steps, random_start=True)

    def run_foolbox(x, y):
        torch.manual_seed(seed)
        _, clipped, _ = fb_attack(fmodel, x, y, epsilons=sc.eps)
        return clipped

    return {"robustlab": run_robustlab, "torchattacks": run_torchattacks, "art": run_art, "foolbox": run_foolbox}


# ---------------------------------------------------------------------- one scenario


def run_scenario(sc: Scenario, repeats: int, seed: int) -> dict:
    model, card = get_model(sc.model_key)
    dataset = card["dataset"]
    x_all, y_all = load_split(dataset, "test")
    x, y = x_all[: sc.n].contiguous(), y_all[: sc.n].contiguous()
    threat = ThreatModel(sc.norm, sc.eps)
    clean = float((predict(model, x) == y).float().mean())
    attacks = make_attacks(model, sc, tuple(x.shape), seed)

    # Fidelity: each tool once on all n examples.
    fidelity: dict[str, dict] = {}
    survived = torch.ones(len(y), dtype=torch.bool)
    for tool in TOOLS:
        log(f"  {tool}: attacking {len(y)} examples ...")
        t0 = time.perf_counter()
        x_adv = attacks[tool](x, y).detach().to(x.dtype)
        seconds = time.perf_counter() - t0
        correct = predict(model, x_adv) == y
        survived &= correct
        fidelity[tool] = {
            "robust_acc": float(correct.float().mean()),
            "valid": float(threat.contains(x_adv, x, tol=1e-5).float().mean()),
            "max_excess": float((threat.distance(x_adv, x) - sc.eps).max()),
            "seconds": seconds,
        }

    # Speed: interleaved repeats on the first time_batch examples.
    def timing(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, dict]:
        contenders = {"floor": lambda: input_gradient_floor(model, xb, yb, sc.steps)}
        for tool in TOOLS:
            contenders[tool] = (lambda t: (lambda: attacks[t](xb, yb)))(tool)
        log(f"  timing {len(yb)} examples x {repeats} interleaved repeats ...")
        return time_interleaved(contenders, repeats, warmup=False)

    b = min(sc.time_batch, len(y))
    timed = timing(x[:b].contiguous(), y[:b].contiguous())

    hard = None
    if sc.no_early_stop_batch:
        idx = survived.nonzero(as_tuple=True)[0][: sc.no_early_stop_batch]
        if len(idx) >= 10:
            xh, yh = x[idx].contiguous(), y[idx].contiguous()
            hard = {"n": len(idx), "times": timing(xh, yh)}
            # How many of these points robustlab still breaks (each one cuts its work short).
            hard["broken_by_robustlab"] = int((predict(model, attacks["robustlab"](xh, yh)) != yh).sum())
    return {"scenario": sc, "clean": clean, "card": card, "fidelity": fidelity, "timing": timed, "time_batch": b, "hard": hard}


# ---------------------------------------------------------------------- report


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab PGD vs torchattacks / ART / foolbox: fidelity and speed")
    out("=" * 78)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/pgd_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    out(f"seed {args.seed}; timing = median of {args.repeats} interleaved repeats; floor = steps x "
        "(forward + backward to the input only)")
    out("")
    out("models (trained by benchmarks/common.py, cached in benchmarks/.cache/):")
    seen = set()
    for r in results:
        key = r["scenario"].model_key
        if key in seen:
            continue
        seen.add(key)
        card, rec = r["card"], r["card"]["training"]["recipe"]
        how = (f"PGD-AT linf eps={rec['adversarial']['eps']} steps={rec['adversarial']['steps']} from {rec['init']}"
               if rec.get("adversarial") else "standard")
        out(f"  {key:10s} {card['architecture']:9s} {how}; {rec['train_subset'] or 'all'} train images x "
            f"{rec['epochs']} epoch(s), {card['training']['seconds']:.0f} s; clean test acc "
            f"{100 * card['clean_accuracy']:.2f}% (full test split)")
    checks: list[tuple[str, bool, str]] = []
    for r in results:
        sc: Scenario = r["scenario"]
        fid, tim = r["fidelity"], r["timing"]
        out("")
        out("-" * 78)
        out(f"{sc.title}")
        out(f"  robust accuracy on the first {sc.n} test examples (clean {100 * r['clean']:.1f}%); "
            f"time on the first {r['time_batch']}")
        floor = tim["floor"]["median"]
        out(f"  {'tool':13s} {'robust acc':>10s} {'rl - tool':>10s} {'in ball':>8s} "
            f"{'time (s)':>9s} {'x floor':>8s} {'rl / tool':>9s}")
        out(f"  {'floor':13s} {'':>10s} {'':>10s} {'':>8s} {floor:9.3f} {1.0:8.2f} "
            f"{tim['robustlab']['median'] / floor:9.2f}")
        ours = fid["robustlab"]["robust_acc"]
        for tool in TOOLS:
            f, t = fid[tool], tim[tool]["median"]
            diff = "" if tool == "robustlab" else f"{100 * (ours - f['robust_acc']):+10.1f}"
            ratio = "" if tool == "robustlab" else f"{tim['robustlab']['median'] / t:9.2f}"
            out(f"  {tool:13s} {100 * f['robust_acc']:9.1f}% {diff:>10s} {100 * f['valid']:7.1f}% "
                f"{t:9.3f} {t / floor:8.2f} {ratio:>9s}")
        fastest = min(PEERS, key=lambda p: tim[p]["median"])
        worst_gap = max(100 * (ours - fid[p]["robust_acc"]) for p in PEERS)
        rl_floor = tim["robustlab"]["median"] / floor
        rl_peer = tim["robustlab"]["median"] / tim[fastest]["median"]
        out(f"  fidelity: robustlab - weakest-looking peer = {worst_gap:+.1f} points (budget <= +{FIDELITY_SLACK})")
        out(f"  speed: robustlab / floor = {rl_floor:.2f} (budget <= {FLOOR_BUDGET}); robustlab / fastest peer "
            f"({fastest}) = {rl_peer:.2f} (budget <= {PEER_BUDGET})")
        checks.append((f"fidelity {sc.title}", worst_gap <= FIDELITY_SLACK, f"{worst_gap:+.1f} pt"))
        checks.append((f"floor    {sc.title}", rl_floor <= FLOOR_BUDGET, f"{rl_floor:.2f}x"))
        checks.append((f"peers    {sc.title}", rl_peer <= PEER_BUDGET, f"{rl_peer:.2f}x ({fastest})"))
        bad = [tool for tool in TOOLS if fid[tool]["valid"] < 1.0]
        if bad:
            out("  outside the threat model (tol 1e-5): " + ", ".join(
                f"{tool} {100 * (1 - fid[tool]['valid']):.1f}% (max excess {fid[tool]['max_excess']:.2g})" for tool in bad))
        hard = r["hard"]
        if hard:
            ht = hard["times"]
            hf = ht["floor"]["median"]
            out(f"  no early stop: {hard['n']} points that survive every tool's attack above "
                f"(robustlab still breaks {hard['broken_by_robustlab']} of them with this seed)")
            out("    " + "  ".join(f"{tool} {ht[tool]['median']:.3f}s ({ht[tool]['median'] / hf:.2f}x)" for tool in ("floor",) + TOOLS))
            h_floor = ht["robustlab"]["median"] / hf
            h_fast = min(PEERS, key=lambda p: ht[p]["median"])
            h_peer = ht["robustlab"]["median"] / ht[h_fast]["median"]
            out(f"    robustlab / floor = {h_floor:.2f}; robustlab / fastest peer ({h_fast}) = {h_peer:.2f}")
            checks.append((f"floor, no early stop, {sc.title}", h_floor <= FLOOR_BUDGET, f"{h_floor:.2f}x"))
            checks.append((f"peers, no early stop, {sc.title}", h_peer <= PEER_BUDGET, f"{h_peer:.2f}x ({h_fast})"))
    out("")
    out("=" * 78)
    out("checks")
    for name, ok, value in checks:
        out(f"  {'PASS' if ok else 'FAIL'}  {name}: {value}")
    out(f"total wall time {wall:.0f} s")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    nm, nc = args.n_mnist, args.n_cifar
    bm, bc = args.time_batch_mnist, args.time_batch_cifar
    out = [
        Scenario("mnist_std", "linf", 0.3, 0.01, 10, nm, bm, "0.3"),
        Scenario("mnist_pgd", "linf", 0.3, 0.01, 10, nm, bm, "0.3", no_early_stop_batch=bm),
        Scenario("mnist_pgd", "linf", 0.3, 0.01, 40, max(1, nm // 2), bm // 2, "0.3", no_early_stop_batch=bm // 2),
        Scenario("cifar_std", "linf", 8 / 255, 2 / 255, 10, nc, bc, "8/255"),
    ]
    if not args.no_l2:
        out.append(Scenario("mnist_pgd", "l2", 2.0, 0.2, 10, max(1, nm // 2), bm, "2.0"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-mnist", type=int, default=1000, help="MNIST test examples for robust accuracy")
    parser.add_argument("--n-cifar", type=int, default=500, help="CIFAR-10 test examples for robust accuracy")
    parser.add_argument("--time-batch-mnist", type=int, default=200, help="MNIST batch for timing")
    parser.add_argument("--time-batch-cifar", type=int, default=100, help="CIFAR-10 batch for timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-l2", action="store_true", help="skip the L2 comparison")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few examples, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS / "pgd_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_mnist, args.n_cifar, args.time_batch_mnist, args.time_batch_cifar, args.repeats = 100, 50, 40, 20, 1
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    for key in ("mnist_std", "mnist_pgd", "cifar_std"):
        get_model(key)  # train (first run only) before anything is timed
    results = []
    for sc in scenarios(args):
        log(f"== {sc.title}")
        results.append(run_scenario(sc, args.repeats, args.seed))
    report = format_report(results, args, time.perf_counter() - t0)
    print(report, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
