"""Adversarial-example detectors on a standard MNIST and CIFAR-10 model: ROC area and detection rate
at 5% false positives against plain PGD, then the detection rate and the fooled points left by the
adaptive attack on classifier and detector together (Carlini & Wagner 2017; Athalye et al. 2018).

    python benchmarks/detection.py [--n 500]

Thresholds are fixed on clean test images (not the evaluated ones) before any attack. Published
figures for orientation (different models, attacks and protocols; the shape to expect, not targets):
LID on CIFAR-10 vs PGD-like attacks AUC about 0.82 (Ma et al. 2018, table 1, BIM); Mahalanobis
(features of all layers, input preprocessing) about 0.99 (Lee et al. 2018); feature squeezing on
MNIST about 0.98 detection of L-inf attacks at 5% FPR (Xu et al. 2018); all fall to near zero under
adaptive attacks (Carlini & Wagner 2017; Athalye et al. 2018; Tramer et al. 2020).
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
from robustlab.defenses.detection import (  # noqa: E402
    create_detector,
    detector_aware_pgd,
    evaluate_detection,
    scores,
    threshold_at,
)
from robustlab.threat import ThreatModel  # noqa: E402

SETTINGS = {
    "mnist": ("mnist_std", 0.3, {"squeeze": {"bits": 1, "median": 2}, "mahalanobis": {}, "lid": {"eps": 0.3},
                                 "magnet": {}}),
    "cifar10": ("cifar_std", 8 / 255, {"squeeze": {"bits": 5, "median": 2}, "mahalanobis": {},
                                       "lid": {"eps": 8 / 255}, "magnet": {}}),
}


def run(dataset: str, n: int) -> list[str]:
    key, eps, detectors = SETTINGS[dataset]
    model, _ = get_model(key)
    x_train, y_train = load_split(dataset, "train")
    x_test, y_test = load_split(dataset, "test")
    x, y = x_test[:n], y_test[:n]
    calibration = x_test[n:n + 500] if len(x_test) >= n + 500 else x_test[-(len(x_test) - n):]
    threat = ThreatModel("linf", eps)
    plain = create_attack("pgd", threat, steps=40).run(model, x, y, torch.Generator().manual_seed(0)).x_adv
    lines = [f"## {dataset}: {key}, Linf {eps:.4g}, PGD-40; {n} evaluated test images, {len(calibration)} clean "
             "calibration images", "",
             "| detector | AUC (PGD) | detected at 5% FPR (PGD) | fooled (PGD) | detected (adaptive) | fooled (adaptive) | "
             "defended accuracy: PGD / adaptive | fit s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, params in detectors.items():
        t0 = time.perf_counter()
        detector = create_detector(name, **params).fit(model, x_train[:5000], y_train[:5000])
        fit_s = time.perf_counter() - t0
        tau = threshold_at(scores(detector, model, calibration), 0.05)
        clean = scores(detector, model, x)
        before = evaluate_detection(model, detector, x, y, plain, tau, clean, "pgd")
        adaptive = detector_aware_pgd(model, detector, x, y, threat, tau, steps=100, weight=2.0,
                                      generator=torch.Generator().manual_seed(0))
        after = evaluate_detection(model, detector, x, y, adaptive, tau, clean, "adaptive")
        log(f"[{dataset}] {name}: {before} / {after}")
        lines.append(f"| {name} {params or ''} | {before.auc:.3f} | {100 * before.detection_rate:.1f}% | {before.fooled} | "
                     f"{100 * after.detection_rate:.1f}% | {after.fooled} | {100 * before.defended_accuracy:.1f}% / "
                     f"{100 * after.defended_accuracy:.1f}% | {fit_s:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--only", choices=sorted(SETTINGS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    lines = ["# Detectors: plain PGD vs the adaptive attack on classifier and detector", "", environment(), ""]
    for dataset in ([args.only] if args.only else list(SETTINGS)):
        lines += run(dataset, args.n) + [""]
    write_report("\n".join(lines), RESULTS / ("detection" + (f"_{args.only}" if args.only else "") + ".txt"))


if __name__ == "__main__":
    main()
