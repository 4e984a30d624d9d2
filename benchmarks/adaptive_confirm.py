"""Two MNIST results of ``defenses_adaptive`` that stand out, checked with other attacks:

1. Bit-depth reduction to 1 bit (and thermometer encoding, which also discretizes) keep many points
   robust at Linf 0.3 under the adaptive BPDA attack. If that is gradient masking that BPDA does not
   undo, gradient-free attacks find what BPDA missed: Square (5000 queries, score-based) on every
   point BPDA left robust, and HopSkipJump (decision-based, Linf, 5000 queries) on a subset of them.
   The thermometer also gets its own attack, LS-PGA (ascent over each pixel's reachable codes), alone
   on every clean-correct point and after BPDA.
2. TV minimization (randomized, 4 prediction draws): the adaptive attack averaged 4 EOT draws; here
   APGD-CE with EOT over 16 and 32 draws attacks the points the 4-draw attack left robust.

    python benchmarks/adaptive_confirm.py [--n 100] [--hsj 20] [--only bits|tv]

Every example is judged by the defended model's own prediction (vote over its draws, fixed generator).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, write_report  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

EPS = 0.3
THREAT = ThreatModel("linf", EPS)


def robust_after(defended, attack, x, y, keep: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Attack the points ``keep`` (bool mask) and return the mask of those still robust (judged by the
    defended model's prediction) and the CPU seconds."""
    idx = keep.nonzero(as_tuple=True)[0]
    out = keep.clone()
    if idx.numel() == 0:
        return out, 0.0
    if hasattr(defended, "set_generator"):
        defended.set_generator(torch.Generator().manual_seed(seed + 1))
    t0 = time.process_time()
    res = attack.run(defended, x[idx], y[idx], torch.Generator().manual_seed(seed))
    seconds = time.process_time() - t0
    x_adv = res.x_adv
    inside = THREAT.distance(x_adv, x[idx]) <= EPS * (1 + 1e-6) + 1e-7
    with torch.no_grad():
        wrong = defended.predict(x_adv, torch.Generator().manual_seed(999)) != y[idx]
    out[idx[wrong & inside]] = False
    return out, seconds


def discretizing(label: str, model_key: str, spec: str, n: int, hsj: int) -> list[str]:
    model, _ = get_model(model_key)
    x, y = load_split("mnist", "test")
    x, y = x[:n], y[:n]
    defended = apply_defenses(model, [spec])
    with torch.no_grad():
        clean = defended.predict(x, torch.Generator().manual_seed(999)) == y
    bpda, s1 = robust_after(defended, create_attack("apgd-ce", THREAT, steps=100), x, y, clean)
    log(f"[{label}] BPDA APGD-CE: {int(bpda.sum())} robust ({s1:.0f} s)")
    bpda_only, extra = bpda.clone(), []
    if spec.startswith("thermometer"):  # its own attack: alone, then on what BPDA left
        alone, s5 = robust_after(defended, create_attack("ls-pga", THREAT), x, y, clean, seed=3)
        log(f"[{label}] LS-PGA alone: {int(alone.sum())} robust ({s5:.0f} s)")
        bpda, s6 = robust_after(defended, create_attack("ls-pga", THREAT), x, y, bpda)
        log(f"[{label}] + LS-PGA: {int(bpda.sum())} robust ({s6:.0f} s)")
        extra = [f"| LS-PGA 100 steps alone (the thermometer's own attack), on every clean-correct point | "
                 f"{100 * float(alone.sum()) / n:.1f}% | {s5:.0f} |",
                 f"| then LS-PGA 100 steps on the points BPDA left robust (worst case so far) | "
                 f"{100 * float(bpda.sum()) / n:.1f}% | {s6:.0f} |"]
    square, s2 = robust_after(defended, create_attack("square", THREAT, queries=5000), x, y, bpda)
    log(f"[{label}] + Square: {int(square.sum())} robust ({s2:.0f} s)")
    subset = square.clone()
    subset[subset.nonzero(as_tuple=True)[0][hsj:]] = False
    hop, s3 = robust_after(defended, create_attack("hopskipjump", THREAT, queries=5000), x, y, subset)
    log(f"[{label}] HopSkipJump on {int(subset.sum())}: {int(hop.sum())} robust ({s3:.0f} s)")
    square_all, s4 = robust_after(defended, create_attack("square", THREAT, queries=5000), x, y, clean, seed=7)
    log(f"[{label}] Square alone: {int(square_all.sum())} robust ({s4:.0f} s)")
    pct = lambda m: f"{100 * float(m.sum()) / n:.1f}%"  # noqa: E731
    return [
        f"## {label}: {model_key} behind {spec}, Linf {EPS}, first {n} MNIST test images", "",
        "| attack | robust accuracy | CPU seconds |", "| --- | --- | --- |",
        f"| clean | {pct(clean)} | |",
        f"| APGD-CE 100 steps, BPDA (the adaptive attack of defenses_adaptive) | {pct(bpda_only)} | {s1:.0f} |",
        *extra,
        f"| then Square 5000 queries on the points {'BPDA and LS-PGA' if extra else 'BPDA'} left robust | "
        f"{pct(square)} | {s2:.0f} |",
        f"| Square 5000 queries alone, on every clean-correct point | {pct(square_all)} | {s4:.0f} |",
        f"| then HopSkipJump (Linf, 5000 queries) on the first {int(subset.sum())} points both left robust | "
        f"{int(subset.sum()) - int(hop.sum())} of {int(subset.sum())} broken | {s3:.0f} |", "",
    ]


def tv_min(n: int) -> list[str]:
    model, _ = get_model("mnist_std")
    x, y = load_split("mnist", "test")
    x, y = x[:n], y[:n]
    spec = "tv-min"  # 4 prediction draws, as in defenses_adaptive
    defended = apply_defenses(model, [spec])
    with torch.no_grad():
        clean = defended.predict(x, torch.Generator().manual_seed(999)) == y
    rows, keep = [], clean
    for eot in (4, 16, 32):
        keep, s = robust_after(defended, create_attack("apgd-ce", THREAT, steps=100, eot=eot), x, y, keep, seed=eot)
        rows.append((eot, keep.clone(), s))
        log(f"[tv-min] EOT {eot}: {int(keep.sum())} robust ({s:.0f} s)")
    pct = lambda m: f"{100 * float(m.sum()) / n:.1f}%"  # noqa: E731
    return [
        f"## tv-min: mnist_std behind {spec} (4 prediction draws), Linf {EPS}, first {n} MNIST test images", "",
        f"clean {pct(clean)}; each row attacks only the points the rows above left robust (BPDA + EOT)", "",
        "| attack | robust accuracy (worst case so far) | CPU seconds |", "| --- | --- | --- |",
        *[f"| APGD-CE 100 steps, EOT over {eot} draws | {pct(m)} | {s:.0f} |" for eot, m, s in rows], "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--hsj", type=int, default=20, help="HopSkipJump on this many points")
    p.add_argument("--only", choices=["bits", "therm", "tv"])
    args = p.parse_args()
    set_threads(1)
    lines = ["# Gradient-free and more-EOT checks of the MNIST defenses that kept points robust", "", environment(), ""]
    if args.only in (None, "bits"):
        lines += discretizing("bit-depth", "mnist_std", "bit-depth:bits=1", args.n, args.hsj)
    if args.only in (None, "therm"):
        lines += discretizing("thermometer", "mnist_therm", "thermometer:levels=16", args.n, args.hsj)
    if args.only in (None, "tv"):
        lines += tv_min(args.n)
    name = "adaptive_confirm" + (f"_{args.only}" if args.only else "")
    write_report("\n".join(lines), RESULTS / f"{name}.txt")


if __name__ == "__main__":
    main()
