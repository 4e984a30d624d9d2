"""Image quilting on MNIST at Linf 0.3 (the MNIST quilting row of ``defenses_trained.py``: mnist_std behind
its quilting library): the strongest attacks we have, side by side, per point.

    python benchmarks/quilting_search.py [--n 100] [--square 5000]
    python benchmarks/quilting_search.py --neighbors 1 --square 0 --out benchmarks/results/quilting_search_neighbors1.txt

Every attack runs on the same first ``--n`` MNIST test images and is judged by the defended model's own
vote (its ``draws`` random quilts, a fixed generator). Reported: robust accuracy under each attack alone,
cumulative (a point counts as broken once any attack above broke it) and the CPU seconds each took.

- APGD-CE and APGD-DLR, BPDA through the identity, EOT over 32 draws (the row's adaptive attack, with
  four times the row's draws);
- ``quilting-search`` (the attack the defense declares; CE and DLR): a greedy search over which
  neighbour set each patch position falls into, swaps ranked by the gradient at real quilts;
- Square (``--square`` queries, no gradients at all) on the points every attack above left correct.

``--neighbors K`` is the ablation: the same defense drawing from its K nearest library patches instead of
the row's 10 (K = 1: quilting without randomness, a fixed projection onto the nearest clean patches).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, shared_data_dir  # noqa: E402
from defenses_trained import SETTINGS  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.predictor import predict  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="first N MNIST test images")
    ap.add_argument("--square", type=int, default=5000, help="Square's queries (0: skip)")
    ap.add_argument("--neighbors", type=int, help="ablation: the defense's neighbours (default: the row's)")
    ap.add_argument("--out", default=str(RESULTS / "quilting_search.txt"), help="results file")
    args = ap.parse_args()
    set_threads(1)
    os.environ.setdefault("ROBUSTLAB_DATA", str(shared_data_dir()))
    _, eps, rows = SETTINGS["mnist"]
    label, model_key, specs = next(r for r in rows if r[0] == "quilting")
    if args.neighbors:
        specs = [f"{specs[0]},neighbors={args.neighbors}"]
    model, _ = get_model(model_key)
    defended = apply_defenses(model, specs).eval()
    x, y = load_split("mnist", "test")
    x, y = x[:args.n], y[:args.n]
    threat = ThreatModel("linf", eps)

    def vote(points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict(defended, points, torch.Generator().manual_seed(999)) == y

    clean = vote(x)
    stages = [("APGD-CE, BPDA, EOT 32", "apgd-ce", {"eot": 32}),
              ("APGD-DLR, BPDA, EOT 32", "apgd-dlr", {"eot": 32}),
              ("quilting-search CE (200 rounds, EOT 8)", "quilting-search", {"steps": 200, "eot": 8}),
              ("quilting-search DLR (200 rounds, EOT 8)", "quilting-search", {"steps": 200, "eot": 8, "loss": "dlr"})]
    if args.square:
        stages.append((f"Square {args.square} queries, on the points left", "square", {"queries": args.square}))
    lines = [f"# Image quilting on MNIST at Linf {eps:g}: the strongest attacks side by side", "", environment(), "",
             f"Defense: {specs[0]} on {model_key}; first {args.n} MNIST test images; every point judged by the "
             f"defended model's vote ({defended.draws} draws, fixed generator). Clean (vote): {100 * clean.float().mean():.1f}%.",
             "", "| attack | robust accuracy, this attack alone | cumulative | CPU seconds |", "| --- | --- | --- | --- |"]
    total = clean.clone()
    for title, name, params in stages:
        only = total.nonzero(as_tuple=True)[0] if name == "square" else torch.arange(args.n)
        defended.set_generator(torch.Generator().manual_seed(3))
        c0 = time.process_time()
        x_adv = x.clone()
        x_adv[only] = create_attack(name, threat, **params).run(defended, x[only], y[only],
                                                                 torch.Generator().manual_seed(1)).x_adv
        seconds = time.process_time() - c0
        robust = vote(x_adv) & clean
        total &= robust
        alone = "(survivors only)" if name == "square" else f"{100 * robust.float().mean():.1f}%"
        lines.append(f"| {title} | {alone} | {100 * total.float().mean():.1f}% | {seconds:.0f} |")
        log(lines[-1])
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
