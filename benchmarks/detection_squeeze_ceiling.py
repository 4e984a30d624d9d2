"""How far an attack on classifier + feature squeezing (1 bit + 2x2 median) can get on the detection
benchmark's MNIST points at Linf 0.3, and what stops it.

1. The binarized classifier alone: PGD-100 through BPDA (identity gradient for the rounding), CE and CW
   losses, 3 random starts each, per-sample union. Fooling classifier + squeezing goes through this (a
   squeezed copy that stays correct is flagged), so it bounds that route of attack.
2. Of those points, how many have the input, its 1-bit copy and its median-filtered copy all on one
   wrong class, and how many of these are also unflagged (the L1 gap between their softmaxes at most
   the threshold fixed at 5% FPR on train[3000:4000], as in benchmarks/detection.py).
3. The detector-aware attack (100 steps x 4 rounds, with its consistent-views round) from a random start
   (as the protocol runs it) and warm-started from the points of 1.

    python benchmarks/detection_squeeze_ceiling.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, set_threads, write_report  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.attacks.detector_aware import DetectorAwareOptions, detector_aware_attack  # noqa: E402
from robustlab.defenses.bpda import BPDA  # noqa: E402
from robustlab.defenses.detection import create_detector  # noqa: E402
from robustlab.eval.protocols.detection import calibrate  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def main() -> None:
    set_threads(1)
    model, _ = get_model("mnist_std")
    model.eval()
    x, y = load_split("mnist", "test")
    x, y = x[:100], y[:100]
    x_train, _ = load_split("mnist", "train")
    detector = create_detector("squeeze", bits=1, median=2)
    cal = calibrate(detector, model, x_train[3000:4000], 0.05)
    binarize = BPDA(torch.round)

    class Binarized(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return model(binarize(z))

    binarized = Binarized().eval()
    threat = ThreatModel("linf", 0.3)
    broken = torch.zeros(len(y), dtype=torch.bool)
    start = x.clone()
    c0 = time.process_time()
    for seed in range(3):
        for loss in ("ce", "cw"):
            x_adv = create_attack("pgd", threat, steps=100, loss=loss).run(binarized, x, y,
                                                                            torch.Generator().manual_seed(seed)).x_adv
            with torch.no_grad():
                new = (binarized(x_adv).argmax(1) != y) & ~broken
            start[new], broken = x_adv[new], broken | new
    ceiling_s = time.process_time() - c0
    with torch.no_grad():
        preds = [model(v).argmax(1) for v in [start, *detector.views(start)]]
        agree = broken & (preds[0] != y) & (preds[1] == preds[0]) & (preds[2] == preds[0])
        unflagged = agree & (detector.score(model, start) <= cal.threshold)

    def score(z: torch.Tensor) -> torch.Tensor:
        return detector.score(model, z)

    options = DetectorAwareOptions(steps=100, rounds=4)
    runs = {}
    for name, init in (("random start", None), ("warm start from 1.", start)):
        c0 = time.process_time()
        res = detector_aware_attack(model, score, x, y, threat, cal.threshold, cal.scale, options,
                                    torch.Generator().manual_seed(0), views=detector.views, init=init)
        runs[name] = (res.success, time.process_time() - c0)
    either = runs["random start"][0] | runs["warm start from 1."][0]
    lines = ["# Feature squeezing (1 bit + 2x2 median) on MNIST at Linf 0.3: how far the attacks get", "",
             environment(), "",
             (f"mnist_std, the first 100 test images (all correctly classified); threshold {cal.threshold:.4f} (5% FPR "
              "on train[3000:4000], clean)."), "",
             (f"1. binarized classifier fooled (PGD-100 + BPDA, CE and CW, 3 seeds, union): {int(broken.sum())} of 100 "
              f"({ceiling_s:.0f} s CPU)"),
             (f"2. of those, input + 1-bit + median copies on one wrong class: {int(agree.sum())}; also unflagged: "
              f"{int(unflagged.sum())}")]
    for name, (success, cpu) in runs.items():
        lines.append(f"3. detector-aware attack 100 x 4 (consistent-views round first), {name}: {int(success.sum())} of "
                     f"100 fooled and unflagged, {int((success & broken).sum())} of them among the points of 1. "
                     f"({cpu:.0f} s CPU)")
    lines.append(f"   either start: {int(either.sum())} of 100")
    write_report("\n".join(lines) + "\n", RESULTS / "detection_squeeze_ceiling.txt")


if __name__ == "__main__":
    main()
