"""Stronger and different attacks on the trained-defense rows of ``defenses_trained.py`` that came out
more than 5 points above the undefended model: each attack in turn on the points every attack before
it left robust (the per-sample worst case so far), judged by the defended model's own prediction
(a vote over its draws, fixed generator), with the attack's CPU seconds.

    python benchmarks/adaptive_confirm_trained.py --case NAME [--n 100]

Cases (models from benchmarks/common.py, the same defense parameters as defenses_trained.py):
``mnist-kwta``, ``cifar-kwta``, ``mnist-mixup``, ``cifar-mixup``, ``mnist-quilting``,
``cifar-quilting``, ``mnist-distill``, ``cifar-distill``, ``mnist-igr``, ``cifar-igr``.
Attacks per case: the row's adaptive attack again, then more EOT draws (randomized defenses) or a
logit loss (APGD-DLR, APGD-T: distillation saturates the softmax), then Square (score-based, no
gradients: what masked gradients cannot stop). With ``--from-store`` the first attack is skipped and
the points the row left robust (its per-sample worst case over adaptive, non-adaptive and transfer
tasks) are read from the row's run in ``benchmarks/.cache/defenses_trained_<data set>*.db``: the same
numbers at a fraction of the CPU time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, environment, get_model, load_split, log, set_threads, shared_data_dir  # noqa: E402
from defenses_trained import SETTINGS  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.eval import ResultsStore  # noqa: E402
from robustlab.predictor import predict  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

# case: (data set, row label word in defenses_trained.SETTINGS, [(description, attack name, params)])
SQUARE = ("Square 5000 queries (score-based)", "square", {"queries": 5000})
CASES = {
    "mnist-kwta": ("mnist", "k-WTA", [
        ("APGD-CE 100 steps, sampled gradients over 16 draws (the row's adaptive attack)", "apgd-ce", {"steps": 100}),
        ("APGD-CE 100 steps, sampled gradients over 64 draws", "apgd-ce", {"steps": 100, "eot": 64}),
        ("APGD-DLR 100 steps, sampled gradients over 64 draws", "apgd-dlr", {"steps": 100, "eot": 64}),
        SQUARE]),
    "mnist-mixup": ("mnist", "mixup", [
        ("APGD-CE 100 steps, EOT over 16 draws (the row's adaptive attack)", "apgd-ce", {"steps": 100}),
        ("APGD-CE 100 steps, EOT over 64 draws", "apgd-ce", {"steps": 100, "eot": 64}),
        ("APGD-DLR 100 steps, EOT over 64 draws", "apgd-dlr", {"steps": 100, "eot": 64}),
        SQUARE]),
    "mnist-quilting": ("mnist", "quilting", [
        ("APGD-CE 100 steps, BPDA, EOT over 4 draws (the row's adaptive attack)", "apgd-ce", {"steps": 100}),
        ("APGD-CE 100 steps, BPDA, EOT over 32 draws", "apgd-ce", {"steps": 100, "eot": 32}),
        ("APGD-DLR 100 steps, BPDA, EOT over 32 draws", "apgd-dlr", {"steps": 100, "eot": 32}),
        # every query runs the nearest-patch search on a new image: 1000 queries
        ("Square 1000 queries (score-based)", "square", {"queries": 1000})]),
    "mnist-distill": ("mnist", "distillation", [
        ("APGD-DLR 100 steps", "apgd-dlr", {"steps": 100}),
        ("APGD-T 100 steps (targeted DLR, 9 targets)", "apgd-t", {"steps": 100}),
        ("PGD on the CW margin, 100 steps", "pgd", {"steps": 100, "loss": "cw"}),
        SQUARE]),
    "mnist-igr": ("mnist", "gradient-reg", [
        ("APGD-CE 100 steps", "apgd-ce", {"steps": 100}),
        ("APGD-T 100 steps (targeted DLR, 9 targets)", "apgd-t", {"steps": 100}),
        SQUARE]),
}
for _name in list(CASES):  # the CIFAR-10 cases attack the same way
    _ds, _label, _stages = CASES[_name]
    CASES["cifar-" + _name.split("-", 1)[1]] = ("cifar10", _label, _stages)


def robust_after(model, attack, x, y, keep: torch.Tensor, threat: ThreatModel, seed: int) -> tuple[torch.Tensor, float]:
    """The mask ``keep`` less the points ``attack`` breaks (inside the ball, misclassified by the model's
    own prediction), and the attack's CPU seconds."""
    idx = keep.nonzero(as_tuple=True)[0]
    out = keep.clone()
    if idx.numel() == 0:
        return out, 0.0
    if hasattr(model, "set_generator"):
        model.set_generator(torch.Generator().manual_seed(seed + 1))
    c0 = time.process_time()
    x_adv = attack.run(model, x[idx], y[idx], torch.Generator().manual_seed(seed)).x_adv
    seconds = time.process_time() - c0
    inside = threat.distance(x_adv, x[idx]) <= threat.eps * (1 + 1e-6) + 1e-7
    inside &= (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    with torch.no_grad():
        wrong = predict(model, x_adv, torch.Generator().manual_seed(999)) != y[idx]
    out[idx[wrong & inside]] = False
    return out, seconds


def stored_worst_case(dataset: str, model_name: str, n: int) -> torch.Tensor | None:
    """Mask (n,) of the points robust in every task of the row's stored run (None if there is none)."""
    for db in sorted(CACHE.glob(f"defenses_trained_{dataset}*.db"), key=lambda f: f.stat().st_mtime, reverse=True):
        with ResultsStore(db, readonly=True) as store:
            runs = [r for r in store.list_runs() if r["model"] == model_name and r["status"] == "complete"]
            if not runs:
                continue
            run_id = runs[-1]["run_id"]
            keep = torch.ones(n, dtype=torch.bool)
            for task in ("main", "non-adaptive", "transfer"):
                rows = store.samples(run_id, task)
                if not rows:
                    continue
                robust = torch.zeros(n, dtype=torch.bool)
                for r in rows:
                    if r.sample_index < n:
                        robust[r.sample_index] = bool(r.robust)
                keep &= robust
            return keep
    return None


def confirm(case: str, n: int, from_store: bool = False) -> list[str]:
    dataset, word, stages = CASES[case]
    std_key, eps, rows = SETTINGS[dataset]
    label, model_key, defenses = next(r for r in rows if word.lower() in r[0].lower())
    model, _ = get_model(model_key)
    defended = apply_defenses(model, defenses or [])
    defended.eval()
    threat = ThreatModel("linf", eps)
    x, y = load_split(dataset, "test")
    x, y = x[:n], y[:n]
    with torch.no_grad():
        keep = predict(defended, x, torch.Generator().manual_seed(999)) == y
    eot = defended.needs().eot if defenses else 1
    lines = [f"## {case}: {model_key}{' behind ' + ', '.join(defenses) if defenses else ''}, Linf {eps:.4g}, "
             f"first {n} {dataset} test images", "",
             f"clean {100 * float(keep.float().mean()):.1f}%; each row attacks only the points the rows above left "
             f"robust (the per-sample worst case so far)", "",
             "| attack | robust accuracy (worst case so far) | CPU seconds |", "| --- | --- | --- |"]
    if from_store:
        stored = stored_worst_case(dataset, f"{model_key}+{label}" if defenses else f"{model_key} standard", n)
        if stored is None:
            sys.exit(f"no finished run of the row {label!r} in {CACHE}/defenses_trained_{dataset}*.db; run "
                     f"defenses_trained.py --only {dataset} --rows ... first, or leave out --from-store")
        keep &= stored
        lines.append(f"| the row's reported worst case (read from its run in the store) | "
                     f"{100 * float(keep.float().mean()):.1f}% | |")
        stages = stages[1:]
    for i, (what, name, params) in enumerate(stages, start=1 if from_store else 0):
        params = dict(params)
        if eot > 1 and name != "square":
            params.setdefault("eot", eot)
        keep, seconds = robust_after(defended, create_attack(name, threat, **params), x, y, keep, threat, seed=i)
        lines.append(f"| {what} | {100 * float(keep.float().mean()):.1f}% | {seconds:.0f} |")
        log(f"[{case}] {lines[-1]}")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True, choices=sorted(CASES))
    p.add_argument("--from-store", action="store_true",
                   help="start from the points the row left robust, read from its stored run (skips the first attack)")
    p.add_argument("--n", type=int, default=None, help="test images (default: 100 MNIST, 50 CIFAR-10, as the table)")
    args = p.parse_args()
    set_threads(1)
    os.environ.setdefault("ROBUSTLAB_DATA", str(shared_data_dir()))
    n = args.n or (100 if CASES[args.case][0] == "mnist" else 50)
    lines = [f"# Stronger attacks on a trained-defense row ({args.case})", "", environment(), "",
             *confirm(args.case, n, args.from_store)]
    out = RESULTS / f"adaptive_confirm_{args.case}.txt"
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
