"""How many of the detection benchmark's MNIST points an attacker can make the 1-bit (binarized)
classifier misclassify at Linf 0.3: PGD-100 through BPDA (identity gradient for the rounding), CE and CW
losses, 3 random starts each, per-sample union. Fooling classifier + feature-squeezing detector (1 bit)
goes through this (a squeezed copy that stays correct is flagged), so it bounds that route of attack.

    python benchmarks/detection_squeeze_ceiling.py   (measured: 19 of the first 100 test images)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import get_model, load_split, set_threads  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.defenses.bpda import BPDA  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def main() -> None:
    set_threads(1)
    model, _ = get_model("mnist_std")
    x, y = load_split("mnist", "test")
    x, y = x[:100], y[:100]
    binarize = BPDA(torch.round)

    class Binarized(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return model(binarize(z))

    binarized = Binarized().eval()
    threat = ThreatModel("linf", 0.3)
    broken = torch.zeros(len(y), dtype=torch.bool)
    for seed in range(3):
        for loss in ("ce", "cw"):
            x_adv = create_attack("pgd", threat, steps=100, loss=loss).run(binarized, x, y,
                                                                            torch.Generator().manual_seed(seed)).x_adv
            with torch.no_grad():
                broken |= binarized(x_adv).argmax(1) != y
    print(f"binarized classifier fooled on {int(broken.sum())} of {len(y)} points (PGD-100, BPDA, CE and CW, 3 seeds)")


if __name__ == "__main__":
    main()
