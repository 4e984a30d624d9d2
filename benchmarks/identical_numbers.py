"""Identical numbers across the evaluation-core refactor: the release's ``--attack standard`` (APGD-CE,
APGD-T, FAB-T, Square 5000 with its rescaled schedule) on an MNIST model,
per-sample outcomes compared with those the release before the core (b9ac979) recorded.

    # once, with the release on the path: train the model and record its outcomes
    PYTHONPATH=/path/to/release python benchmarks/identical_numbers.py record
    # with the current code: evaluate the same weights and compare sample by sample
    python benchmarks/identical_numbers.py compare

The model (SmallCNN, one epoch of standard training on MNIST) lives in benchmarks/.cache; the
release's record is benchmarks/results/identical_numbers_release.json, the comparison
benchmarks/results/identical_numbers.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "golden"))

from golden_spec import record  # noqa: E402

try:  # the release's layout, then the current one
    from robustlab.bench.runner import EvalOptions, evaluate
    from robustlab.bench.store import ResultsStore
except ImportError:
    from robustlab.eval import EvalOptions, ResultsStore, evaluate
from robustlab.attacks import build_attacks  # noqa: E402
from robustlab.data import load_dataset  # noqa: E402
from robustlab.models import create_model, load_model, save_checkpoint  # noqa: E402
from robustlab.models.checkpoint import ModelCard  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402
from robustlab.training import TrainConfig, train  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
CACHE = HERE / ".cache"
MODEL = CACHE / "identical_mnist_smallcnn.safetensors"
RELEASE = HERE / "results" / "identical_numbers_release.json"
N, EPS, SEED, BATCH = 200, 0.1, 0, 100


def run_eval(model_path: Path = MODEL) -> tuple[dict, float]:
    model = load_model(str(model_path)).model.eval()
    data = load_dataset("mnist", "test", root=DATA).subset(N)
    # The release's `standard` suite, spelt out: since issue 20, `standard` runs Square on the
    # reference's (not rescaled) schedule, which changes its numbers by design.
    attacks = build_attacks(["apgd-ce:steps=100", "apgd-t:steps=100,n_target_classes=9",
                             "fab-t:steps=100,n_target_classes=9", "square:queries=5000"], ThreatModel("linf", EPS))
    t0 = time.process_time()
    with ResultsStore(CACHE / f"identical_{time.time_ns()}.db") as store:
        result = evaluate(model, data, attacks, store, model_name="mnist_smallcnn_1epoch",
                          options=EvalOptions(seed=SEED, batch_size=BATCH, steps_grid=()))
        rec = record(store, result.run_id, result.summary, result.checks)
    return rec, time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("--model", type=Path, help="evaluate these weights instead (record: no training; e.g. the "
                   "benchmarks' mnist_pgd); record and compare write their own files, suffixed by the model's name")
    args = p.parse_args()
    global RELEASE
    model_path = args.model or MODEL
    suffix = "" if args.model is None else f"_{args.model.stem}"
    RELEASE = RELEASE.with_name(f"identical_numbers_release{suffix}.json")
    torch.set_num_threads(1)
    CACHE.mkdir(exist_ok=True)
    if args.mode == "record" and args.model is not None:
        rec, seconds = run_eval(model_path)
        rec["seconds"] = seconds
        RELEASE.write_text(json.dumps(rec, sort_keys=True) + "\n")
        print(f"recorded {len(rec['tasks']['main'])} samples in {seconds:.1f}s CPU")
        return
    if args.mode == "record":
        torch.manual_seed(0)
        model = create_model("smallcnn", num_classes=10, in_channels=1)
        train(model, load_dataset("mnist", "train", root=DATA).subset(20000),
              TrainConfig(epochs=1, batch_size=128, lr=0.001, optimizer="adam", seed=0), progress=False)
        save_checkpoint(model.eval(), MODEL, ModelCard.for_architecture(
            "smallcnn", num_classes=10, in_channels=1, dataset="mnist:train[20000]"))
        rec, seconds = run_eval()
        rec["seconds"] = seconds
        RELEASE.write_text(json.dumps(rec, sort_keys=True) + "\n")
        print(f"recorded {len(rec['tasks']['main'])} samples in {seconds:.1f}s: robust {rec['summary']['robust_accuracy']}")
        return
    rec, seconds = run_eval(model_path)
    for _ in range(1200):  # the release's record may be written by a run started beside this one
        if RELEASE.is_file():
            break
        time.sleep(1)
    release = json.loads(RELEASE.read_text())
    lines = [f"--attack standard, Linf {EPS}, first {N} MNIST test images, seed {SEED}, batches of {BATCH}, one thread",
             f"model: {model_path.name} (weights in benchmarks/.cache)"]
    same_rows = all(rec["tasks"][t] == rows for t, rows in release["tasks"].items())
    # Since issue 20 the headline is the worst case over the whole run; the ensemble's own number is
    # the release's robust accuracy (here the run computes nothing else, so the two agree).
    ens = rec["summary"].get("ensemble_robust_accuracy", rec["summary"]["robust_accuracy"])
    same_summary = rec["summary"]["clean_accuracy"] == release["summary"]["clean_accuracy"] and (
        ens == release["summary"]["robust_accuracy"]) and [
        {k: a[k] for k in ("name", "broken", "robust_accuracy", "gradients", "forwards")} for a in rec["summary"]["attacks"]
    ] == [{k: a[k] for k in ("name", "broken", "robust_accuracy", "gradients", "forwards")} for a in release["summary"]["attacks"]]
    for name, r in (("release b9ac979", release), ("this code", rec)):
        s = r["summary"]
        broken = ", ".join(f"{a['name']} {a['broken']}" for a in s["attacks"])
        lines.append(f"  {name:<16} clean {100 * s['clean_accuracy']:.2f}%  robust {100 * s['robust_accuracy']:.2f}%  "
                     f"broken by: {broken}  ({r.get('seconds', seconds):.1f}s)")
    differ = sum(a != b for t, rows in release["tasks"].items() for a, b in zip(rows, rec["tasks"][t]))
    lines.append(f"per-sample records identical: {same_rows} ({differ} of {len(release['tasks']['main'])} differ); "
                 f"summary numbers identical: {same_summary}")
    lines.append(f"process CPU time, this code / release: {seconds / release['seconds']:.2f} "
                 f"({seconds:.1f} s / {release['seconds']:.1f} s; side by side only when the two ran at once)")
    text = "\n".join(lines)
    print(text)
    (HERE / "results" / f"identical_numbers{suffix}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
