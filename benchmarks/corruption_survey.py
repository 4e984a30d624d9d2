"""The survey's finding, reproduced: does adversarial training help under common corruptions?

On MNIST the MNIST-C paper (Mu & Gilmer, 2019) found that PGD adversarial training does not help, and
can hurt, on most of its corruptions. This script evaluates a standard model and adversarially trained
ones under the 15 MNIST-C corruptions with the corruption protocol (corrupted on the fly, rows in a
results store, resumable), and prints per-corruption errors, the mean corruption error, and CE / mCE /
relative mCE with the standard model as the baseline (so the standard model's mCE is 100%). With
``--cifar MODEL=PATH`` pairs it does the same on the shared CIFAR-10 test subset with the ImageNet-C
corruptions (when they are registered).

    python benchmarks/corruption_survey.py --model std=mnist_std.safetensors \\
        --model pgd-at=mnist_pgdat.safetensors --model trades=mnist_trades.safetensors --n 1000

The first ``--model`` is the baseline. Each model's robust accuracy under PGD-20 (Linf 0.3, step 2.5 eps / 20,
the first ``--robust-n`` images) is printed beside, to show the adversarial training took. Run it
with ``nice``; figures go to benchmarks/results/corruption_survey.txt (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustlab.corruptions import CORRUPTIONS, suite
from robustlab.data import load_dataset
from robustlab.eval.metrics import baseline_from_summary
from robustlab.eval.protocols import CorruptionProtocol
from robustlab.eval.runner import run
from robustlab.eval.store import ResultsStore
from robustlab.models import load_model


def robust_accuracy(model, data, eps: float, n: int) -> float:
    from robustlab.attacks import create_attack
    from robustlab.threat import ThreatModel

    x, y = data.batch(range(min(n, len(data))))
    attack = create_attack("pgd", ThreatModel("linf", eps), steps=20, alpha=2.5 * eps / 20)
    x_adv = attack.run(model, x, y, generator=torch.Generator().manual_seed(0)).x_adv
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def survey(models: list[tuple[str, str]], data, names: list[str], store: ResultsStore, eps: float, robust_n: int,
           batch_size: int, log) -> tuple[list[str], list[str]]:
    """Evaluate every model; return the table lines and notes."""
    runs, robust, seconds = {}, {}, {}
    for label, path in models:
        model = load_model(path).model
        t0 = time.process_time()
        res = run(model, data, CorruptionProtocol(names), store, seed=0, batch_size=batch_size, model_name=label,
                  resume=True, progress=False)
        seconds[label] = time.process_time() - t0
        runs[label] = store.get_run(res.run_id)
        robust[label] = robust_accuracy(model, data, eps, robust_n) if robust_n else None
        log(f"{label}: clean error {res.summary['clean_error']:.4f}, mean corruption error "
            f"{res.summary['mean_corruption_error']:.4f} ({seconds[label]:.0f} s CPU)")
    base_label = models[0][0]
    baseline = {"name": f"{base_label} ({runs[base_label]['run_id']})",
                "errors": baseline_from_summary(runs[base_label]["summary"])}
    summaries = {}
    for label, r in runs.items():
        config = {**r["config"], "baseline": {"name": baseline["name"], "errors": {
            c: {str(s): e for s, e in per.items()} for c, per in baseline["errors"].items()}}}
        summaries[label] = CorruptionProtocol.summarize(store, {**r, "config": config})
    labels = [m[0] for m in models]
    w = max(len(n) for n in names) + 2
    head = "corruption".ljust(w) + "".join(f"{lab:>12}" for lab in labels)
    lines = ["error (%) per corruption", head]
    for name in names:
        lines.append(name.ljust(w) + "".join(
            f"{100 * summaries[lab]['per_corruption'][names.index(name)]['mean_error']:12.2f}" for lab in labels))
    worse = {lab: sum(summaries[lab]["per_corruption"][i]["mean_error"] > summaries[base_label]["per_corruption"][i][
        "mean_error"] for i in range(len(names))) for lab in labels}
    lines += [
        "-" * len(head),
        "clean error".ljust(w) + "".join(f"{100 * summaries[lab]['clean_error']:12.2f}" for lab in labels),
        "mean corr. error".ljust(w) + "".join(f"{100 * summaries[lab]['mean_corruption_error']:12.2f}" for lab in labels),
        f"mCE vs {base_label}".ljust(w) + "".join(f"{100 * summaries[lab]['mce']:12.1f}" for lab in labels),
        f"rel. mCE vs {base_label}".ljust(w) + "".join(
            f"{100 * summaries[lab]['relative_mce']:12.1f}" if summaries[lab]["relative_mce"] is not None
            else f"{'—':>12}" for lab in labels),
        f"worse than {base_label} on".ljust(w) + "".join(f"{worse[lab]:>9}/{len(names)}" for lab in labels),
        f"PGD-20 acc eps={eps:g}".ljust(w) + "".join(
            f"{100 * robust[lab]:12.1f}" if robust[lab] is not None else f"{'—':>12}" for lab in labels),
        "CPU s (protocol)".ljust(w) + "".join(f"{seconds[lab]:12.0f}" for lab in labels),
    ]
    notes = [f"{lab}: {path}" for lab, path in models]
    return lines, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                   help="an MNIST model (the first is the baseline of CE / mCE)")
    p.add_argument("--cifar", action="append", default=[], metavar="LABEL=PATH",
                   help="CIFAR-10 models for the same comparison with the ImageNet-C corruptions")
    p.add_argument("--n", type=int, default=1000, help="test images (the first N)")
    p.add_argument("--cifar-n", type=int, default=500)
    p.add_argument("--robust-n", type=int, default=200, help="images for the PGD-20 check (0: skip)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--db", default=str(ROOT / "benchmarks" / ".cache" / "corruption_survey.db"))
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--note", action="append", default=[], help="a line for the results file (e.g. how a model was trained)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corruption_survey.txt"))
    args = p.parse_args()
    torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = ["# Corruption survey: adversarial training under common corruptions",
           f"# robustlab {ROOT.name}, torch {torch.__version__}, 1 thread on a shared 2-core CPU",
           ""]
    with ResultsStore(args.db) as store:
        data = load_dataset("mnist", "test", root=args.data_root).subset(args.n)
        lines, notes = survey([tuple(m.split("=", 1)) for m in args.model], data, suite("mnist-c"), store, 0.3,
                              args.robust_n, args.batch_size, log)
        out += [f"## MNIST: MNIST-C (15 corruptions, the released severity), first {len(data)} test images, seed 0",
                *lines, "", *notes, ""]
        if args.cifar:
            if not any(c.suite_name == "imagenet-c" for c in CORRUPTIONS._items.values()):
                out += ["## CIFAR-10: not run (the ImageNet-C corruptions are not registered in this build)", ""]
            else:
                cdata = load_dataset("cifar10", "test", root=args.data_root).subset(args.cifar_n)
                lines, notes = survey([tuple(m.split("=", 1)) for m in args.cifar], cdata, suite("imagenet-c"), store,
                                      8 / 255, args.robust_n, args.batch_size, log)
                out += [(f"## CIFAR-10: the 15 ImageNet-C corruptions at severities 1-5 (32 px tables), first "
                        f"{len(cdata)} test images of the shared subset, seed 0"), *lines, "", *notes, ""]
    out += [f"# {note}" for note in args.note]
    out.append(f"# wall time {time.time() - t0:.0f} s")
    text = "\n".join(out) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
