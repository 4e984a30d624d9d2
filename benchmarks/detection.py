"""Adversarial-example detectors on a standard MNIST and CIFAR-10 model, through the detection protocol
(robustlab.eval.protocols.detection, the numbers `robustlab detect` stores): ROC area and detection rate
at 5% false positives against plain PGD, then what the detector-aware attack leaves (detection rate,
fooled points, robust accuracy of classifier + detector), beside the first adaptive attack
(defenses.detection.detector_aware_pgd: CE with a fixed-weight hinge, 100 steps) on the same points.

    python benchmarks/detection.py [--n 200] [--only mnist|cifar10] [--detectors squeeze,magnet]

Detectors are fitted on the first 3,000 training images (LID also on PGD-10 examples of them), and the
threshold fixed on the next 1,000 training images (clean) before any attack; the evaluated points are
the first n test images. Published figures for orientation (different models, attacks and protocols):
LID on CIFAR-10 vs BIM AUC about 0.82 (Ma et al. 2018, table 1); Mahalanobis (features of all layers,
input preprocessing) about 0.99 (Lee et al. 2018); feature squeezing on MNIST about 0.98 detection of
L-inf attacks at 5% FPR (Xu et al. 2018); all fall to near zero under adaptive attacks (Carlini & Wagner
2017; Athalye et al. 2018; Bryniarski et al. 2022).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, write_report  # noqa: E402

from robustlab.attacks.detector_aware import DetectorAwareOptions  # noqa: E402
from robustlab.data import ImageDataset  # noqa: E402
from robustlab.defenses.detection import create_detector, detector_aware_pgd  # noqa: E402
from robustlab.eval.protocols.detection import (  # noqa: E402
    DetectionOptions,
    DetectionProtocol,
    DetectorData,
)
from robustlab.eval.runner import run as run_protocol  # noqa: E402
from robustlab.eval.store import ResultsStore  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

SETTINGS = {
    "mnist": ("mnist_std", 0.3, {"squeeze": {"bits": 1, "median": 2}, "magnet": {}, "mahalanobis": {}, "lid": {}}),
    "cifar10": ("cifar_std", 8 / 255, {"squeeze": {"bits": 5, "median": 2}, "magnet": {}, "mahalanobis": {},
                                       "lid": {}}),
}
FIT_N, CAL_N = 3000, 1000


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def run(dataset: str, n: int, only: list[str] | None, adaptive: DetectorAwareOptions, save=lambda lines: None) -> list[str]:
    key, eps, detectors = SETTINGS[dataset]
    model, _ = get_model(key)
    x_train, y_train = load_split(dataset, "train")
    x_test, y_test = load_split(dataset, "test")
    data = ImageDataset(dataset, "test", x_test[:n], y_test[:n], [str(i) for i in range(10)])
    threat = ThreatModel("linf", eps)
    lines = [f"## {dataset}: {key}, Linf {eps:.4g}; {n} evaluated test images; detectors fitted on train[0:{FIT_N}], "
             f"threshold at 5% FPR on train[{FIT_N}:{FIT_N + CAL_N}] (clean)", "",
             (f"Plain attack PGD-40 (CE); adaptive: detector-aware, {adaptive.steps} steps x {adaptive.rounds} rounds "
              "(a selective round, then the weighted search; for squeeze a consistent-views round of as many steps "
              "first); old adaptive: detector_aware_pgd, 100 steps, weight 2."), "",
             "| detector | clean acc. | AUC (PGD) | detected (PGD) | fooled: PGD / old adaptive / new adaptive | "
             "detected (new adaptive) | robust acc.: classifier alone / + detector vs PGD / + detector, worst case | "
             "run s (wall: fit + attacks) | run CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, params in detectors.items():
        if only and name not in only:
            continue
        detector = create_detector(name, **params)
        fitting = DetectorData(x_train[:FIT_N], y_train[:FIT_N], x_train[FIT_N:FIT_N + CAL_N], 0.05,
                               f"train[0:{FIT_N}]", f"train[{FIT_N}:{FIT_N + CAL_N}]")
        protocol = DetectionProtocol(detector, threat, fitting, DetectionOptions(pgd_steps=40, adaptive=adaptive))
        c0 = time.process_time()
        with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "d.db") as store:
            t0 = time.perf_counter()
            result = run_protocol(model, data, protocol, store, batch_size=100, examples=0, model_name=key)
            rows = store.sample_rows("detection_samples", result.run_id, "main")
        attack_s = time.process_time() - c0
        run_s = time.perf_counter() - t0  # fit, calibration and attacks together (wall)
        cal = protocol.calibration
        s = result.summary
        # the first adaptive attack, on the same correctly classified points
        idx = torch.tensor([r["sample_index"] for r in rows if r["clean_correct"]])
        xs, ys = x_test[idx], y_test[idx]
        old = torch.cat([detector_aware_pgd(model, detector, xs[i:i + 100], ys[i:i + 100], threat, cal.threshold,
                                            steps=100, weight=2.0, generator=torch.Generator().manual_seed(i))
                         for i in range(0, len(xs), 100)])
        with torch.no_grad():
            old_fooled = int(((model(old).argmax(1) != ys) & (detector.score(model, old) <= cal.threshold)).sum())
        pgd, new = s["attacks"]["pgd"], s["attacks"]["adaptive"]
        log(f"[{dataset}] {name}: {s['robust_accuracy']} pgd {pgd} new {new} old fooled {old_fooled}")
        lines.append(f"| {name} {params or ''} | {_pct(s['clean_accuracy'])} | {pgd['auc']:.3f} | "
                     f"{_pct(pgd['detection_rate'])} | {pgd['fooled']} / {old_fooled} / {new['fooled']} | "
                     f"{_pct(new['detection_rate'])} | {_pct(s['undefended_robust_accuracy'])} / "
                     f"{_pct(s['non_adaptive']['robust_accuracy'])} / {_pct(s['robust_accuracy'])} | {run_s:.0f} | "
                     f"{attack_s:.0f} |")
        save(lines)  # each detector's line as soon as it is measured
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--only", choices=sorted(SETTINGS))
    p.add_argument("--detectors", help="comma-separated subset of squeeze, magnet, mahalanobis, lid")
    p.add_argument("--steps", type=int, default=200, help="detector-aware attack: steps per round")
    p.add_argument("--rounds", type=int, default=5, help="detector-aware attack: rounds")
    p.add_argument("--magnet-steps", type=int, default=2000, help="MagNet auto-encoder training steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    for _, _, detectors in SETTINGS.values():
        detectors["magnet"] = {"steps": args.magnet_steps} if args.magnet_steps != 2000 else {}
    set_threads(args.threads)
    only = args.detectors.split(",") if args.detectors else None
    adaptive = DetectorAwareOptions(steps=args.steps, rounds=args.rounds)
    lines = ["# Detectors through the detection protocol: plain PGD vs the detector-aware attack", "", environment(), ""]
    suffix = (f"_{args.only}" if args.only else "") + (f"_{'_'.join(only)}" if only else "")
    path = RESULTS / f"detection{suffix}.txt"
    for dataset in ([args.only] if args.only else list(SETTINGS)):
        done = list(lines)
        lines += run(dataset, args.n, only, adaptive, lambda part, done=done: write_report("\n".join(done + part), path))
        lines.append("")
    write_report("\n".join(lines), path)


if __name__ == "__main__":
    main()
