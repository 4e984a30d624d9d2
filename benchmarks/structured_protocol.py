"""The structured protocol against the library calls it replaces, on the same work: MNIST SmallCNN
(``mnist_std``), the first N test images, spatial / universal / patch threat models at the defaults of
``robustlab structured`` (perturbation and patch fitted on the first FIT training images).

Three measurements side by side in one process (CPU time, ``time.process_time``):

1. the library: ``evaluate_spatial``, ``evaluate_universal``, ``evaluate_patch`` on all N images at
   once, with the generators the protocol derives from the seed, in the runtime the runner uses
   (``fast_runtime``: outside it, channels-last rounding alone moves a signed-gradient fit);
2. the protocol through the runner into a store, all N images in one batch: must give the same points
   (per-sample robust flags) and numbers as 1; the CPU-time ratio is the runner's overhead (store,
   probes, rows, summary);
3. the same in batches of 128 (the command's default): the spatial first-order attack's random starts
   and the patch's random positions are drawn per batch, so those may differ; the rest is equal.

    python benchmarks/structured_protocol.py [--n 500] [--fit 1000]

Writes benchmarks/results/structured_protocol.txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, environment, get_model, set_threads, shared_data_dir, write_report  # noqa: E402

from robustlab.data import load_dataset  # noqa: E402
from robustlab.eval.protocols.structured import (  # noqa: E402
    StructuredProtocol,
    batch_generator,
    fit_generator,
    parse_threat,
)
from robustlab.eval.runner import run  # noqa: E402
from robustlab.eval.store import ResultsStore  # noqa: E402
from robustlab.eval.structured import evaluate_patch, evaluate_spatial, evaluate_universal  # noqa: E402

THREATS = ["spatial:angle=30,shift=3", "universal:norm=linf,eps=0.2", "patch:size=8"]
SEED = 0


def library(model, specs, x, y, fx, fy):
    """The library calls in the runtime the runner evaluates in (channels-last where safe, subnormal
    weights zeroed: the same float rounding, so a signed-gradient fit takes the same steps)."""
    from robustlab.models.runtime import fast_runtime

    with fast_runtime(model, x):
        return _library(model, specs, x, y, fx, fy)


def _library(model, specs, x, y, fx, fy):
    s, u, p = specs
    return {
        s.name: evaluate_spatial(model, x, y, s.attacks, batch_generator(SEED, s.name, 0)),
        u.name: evaluate_universal(model, u.attacks[0], fx, fy, x, y, fit_generator(SEED, u.name)),
        p.name: evaluate_patch(model, p.attacks[0], fx, fy, x, y, p.draws, fit_generator(SEED, p.name),
                               batch_generator(SEED, p.name, 0)),
    }


def protocol(model, data, specs, fx, fy, batch):
    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "s.db") as store:
        result = run(model, data, StructuredProtocol(specs, data.image_shape, (fx, fy), "mnist:train"), store,
                     seed=SEED, batch_size=batch, examples=0, progress=False)
        robust = {s.name: [r["robust"] for r in store.sample_rows("structured_samples", result.run_id, s.name)]
                  for s in specs}
    return result.summary, robust


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--fit", type=int, default=1000)
    args = ap.parse_args()
    set_threads(1)
    model, _ = get_model("mnist_std")
    model.eval()
    data = load_dataset("mnist", "test", root=shared_data_dir()).subset(args.n)
    x, y = data.batch(range(len(data)))
    fx, fy = load_dataset("mnist", "train", root=shared_data_dir()).batch(range(args.fit))
    specs = [parse_threat(t) for t in THREATS]

    t0 = time.process_time()
    lib = library(model, specs, x, y, fx, fy)
    t_lib = time.process_time() - t0
    t0 = time.process_time()
    one, one_robust = protocol(model, data, specs, fx, fy, args.n)
    t_one = time.process_time() - t0
    t0 = time.process_time()
    many, many_robust = protocol(model, data, specs, fx, fy, 128)
    t_many = time.process_time() - t0

    title = (f"structured protocol vs library, MNIST SmallCNN (mnist_std), n = {args.n} test images, fit on "
             f"{args.fit} training images, seed {SEED}, 1 thread")
    lines = [title, environment(), "",
             f"{'threat model':<30} {'number':<26} {'library':>9} {'run, 1 batch':>13} {'run, 128/batch':>15}"]
    keys = {"spatial": [("worst case", "robust_accuracy")],
            "universal": [("universal", "robust_accuracy"), ("fooling_rate", "fooling_rate")],
            "patch": [("random position", "random_position_accuracy"), ("worst position", "worst_position_accuracy")]}
    verdicts = []
    for s in specs:
        r = lib[s.name]
        for lib_key, key in keys[s.kind]:
            ref = r.extras[lib_key] if lib_key == "fooling_rate" else r.robust_accuracy[lib_key]
            a, b = one["threats"][s.name][key], many["threats"][s.name][key]
            lines.append(f"{s.name:<30} {key:<26} {100 * ref:8.2f}% {100 * a:12.2f}% {100 * b:14.2f}%")
            verdicts.append(abs(a - ref) < 1e-6)
        same_points = one_robust[s.name] == [int(v) for v in r.robust]
        verdicts.append(same_points)
        differ = sum(a != b for a, b in zip(one_robust[s.name], many_robust[s.name]))
        lines.append(f"{'':<30} {'same robust points as library':<26} {same_points!s:>9}   (128/batch: "
                     f"{differ} of {args.n} differ)")
        if "median_fooling" in one["threats"][s.name]:
            m = one["threats"][s.name]["median_fooling"]
            lines.append(f"{'':<30} median transformation that fooled: |angle| {m['angle']:.3g} deg, |dx| "
                         f"{m['dx']:.3g} px, |dy| {m['dy']:.3g} px")
    cpu = (f"CPU seconds: library {t_lib:.1f}, protocol 1 batch {t_one:.1f} (ratio {t_one / t_lib:.3f}), "
           f"protocol 128/batch {t_many:.1f} (ratio {t_many / t_lib:.3f}); all three in fast_runtime")
    lines += ["", cpu,
              f"verdict: {'PASS' if all(verdicts) else 'FAIL'} (one-batch run equals the library, point by point)"]
    report = "\n".join(lines) + "\n"
    write_report(report, RESULTS / "structured_protocol.txt")


if __name__ == "__main__":
    main()
