"""Corruption generation speed: robustlab against the imagecorruptions package.

The claim under test (issue #17): generating all 19 corruptions x 5 severities for the 10,000 CIFAR-10
test images (the shared JPEG copy of the test set) runs at least 20x faster with robustlab than with
imagecorruptions on the same machine, and glass blur is not robustlab's bottleneck.

Setup: the first N images of ``cifar10_test_jpeg75.npz`` (default 200), every corruption and severity,
both tools in this one process on the same images:

- imagecorruptions: ``corrupt(image, severity, name)`` image by image, as its users call it (uint8
  HWC in, uint8 out). At 32 px it keeps its ImageNet constants (the only ones it has).
- robustlab: ``create_corruption(name, severity)(x, generator)`` on the whole sample as one batch,
  with the CIFAR-10-C constants that 32 px images get, and again with ``table=224`` (the ImageNet
  constants the package uses, so the same work is timed).

Timing: the machine may be shared, so the number is this process's CPU time (``time.process_time``)
with one intra-op thread for torch and OpenCV; wall time is printed next to it. Projections to 10,000
images scale the sample's time linearly (both tools work image by image or in batches of the sample's
size; robustlab's batches of 10,000 images would be larger, which only helps it).

Usage: python benchmarks/corruptions_speed.py [--n 200] [--seed 0]
Cost: about 3 minutes of CPU at N = 200 (almost all of it imagecorruptions).
The report is printed and written to benchmarks/results/corruptions_speed.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import corruption_peer
from benchmarks.common import RESULTS, environment, log, set_threads
from robustlab.corruptions import create_corruption, suite

FULL = 10_000


def time_peer(ic, images, name: str) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for severity in range(1, 6):
        for img in images:
            ic.corrupt(img, severity=severity, corruption_name=name)
    return time.process_time() - cpu, time.perf_counter() - wall


def time_ours(x: torch.Tensor, name: str, seed: int, table: int = 0) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for severity in range(1, 6):
        c = create_corruption({"name": name, "params": {"severity": severity, "table": table}})
        c(x, torch.Generator().manual_seed(seed + severity))
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images in the sample (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    ic = corruption_peer.load()
    x, _ = corruption_peer.load_cifar_jpeg(args.n)
    images = list(corruption_peer.to_numpy_images(x))
    names = suite("all-c")
    # warm both (imports, texture loading, per-size operators) so one-time costs are not timed
    for name in names:
        for severity in range(1, 6):
            ic.corrupt(images[0], severity=severity, corruption_name=name)
            for table in (0, 224):
                c = create_corruption({"name": name, "params": {"severity": severity, "table": table}})
                c(x[:2], torch.Generator().manual_seed(0))

    rows = []
    for name in names:
        peer = time_peer(ic, images, name)
        ours = time_ours(x, name, args.seed)
        ours224 = time_ours(x, name, args.seed, table=224)
        rows.append((name, peer, ours, ours224))
        log(f"{name:18s} imagecorruptions {peer[0]:7.2f} s  robustlab {ours[0]:6.3f} s  (table=224: {ours224[0]:6.3f} s)")

    n = args.n
    scale = FULL / n
    lines = [
        "Corruption generation speed: robustlab vs imagecorruptions (issue #17)",
        f"environment: {environment()}",
        (f"sample: the first {n} images of cifar10_test_jpeg75.npz (32x32 RGB), 19 corruptions x 5 severities each; "
        "CPU seconds of this process (one thread), wall seconds in brackets"),
        ("robustlab: one batch of the whole sample per corruption and severity; 'cifar' = the CIFAR-10-C constants "
        "32 px images get, 'table=224' = the ImageNet constants imagecorruptions applies"),
        "",
        f"{'corruption':18s} {'imagecorruptions':>18s} {'robustlab cifar':>17s} {'ratio':>7s} {'robustlab 224':>15s} {'ratio':>7s}",
    ]
    tot_p = tot_o = tot_o224 = 0.0
    for name, peer, ours, ours224 in rows:
        tot_p, tot_o, tot_o224 = tot_p + peer[0], tot_o + ours[0], tot_o224 + ours224[0]
        lines.append(f"{name:18s} {peer[0]:8.2f} ({peer[1]:6.1f}) {ours[0]:7.3f} ({ours[1]:6.2f}) "
                     f"{peer[0] / max(ours[0], 1e-9):6.0f}x {ours224[0]:6.3f} ({ours224[1]:6.2f}) "
                     f"{peer[0] / max(ours224[0], 1e-9):6.0f}x")
    lines.append(f"{'total':18s} {tot_p:8.2f} {'':8s} {tot_o:7.3f} {'':8s} {tot_p / tot_o:6.1f}x {tot_o224:6.3f} "
                 f"{'':8s} {tot_p / tot_o224:6.1f}x")
    lines.append("")
    lines.append(f"projected to all {FULL:,} test images x 19 corruptions x 5 severities (CPU, one thread): "
                 f"imagecorruptions {tot_p * scale / 60:.1f} min, robustlab {tot_o * scale / 60:.2f} min "
                 f"(CIFAR constants) / {tot_o224 * scale / 60:.2f} min (ImageNet constants)")
    by_time = sorted(rows, key=lambda r: -r[2][0])
    glass = next(r for r in rows if r[0] == "glass_blur")
    rank = [r[0] for r in by_time].index("glass_blur") + 1
    lines.append(f"robustlab's slowest: {', '.join(f'{r[0]} {r[2][0]:.2f} s' for r in by_time[:3])}; glass blur "
                 f"is number {rank} of 19 ({100 * glass[2][0] / tot_o:.1f}% of robustlab's time; "
                 f"{100 * glass[1][0] / tot_p:.1f}% of imagecorruptions')")
    ratio = tot_p / tot_o
    lines.append(f"{'PASS' if ratio >= 20 else 'FAIL'}: total speed-up {ratio:.1f}x (target >= 20x) with the CIFAR "
                 f"constants; {tot_p / tot_o224:.1f}x at the package's own ImageNet constants")
    lines.append(f"{'PASS' if rank > 1 else 'FAIL'}: glass blur is not robustlab's bottleneck (number {rank})")
    report = "\n".join(lines)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "corruptions_speed.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
