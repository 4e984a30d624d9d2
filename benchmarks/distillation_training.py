"""Why the defensive-distillation reference models did not learn at T = 100 with SGD at lr 5 (11% clean),
and what trains them: the first network of defensive distillation (``distillation:temperature=T`` on
hard labels), SmallCNN from scratch on 10,000 MNIST training images, one epoch (79 steps of 128),
cosine schedule, each optimizer setting side by side, and the same network at T = 1 for reference.

    python benchmarks/distillation_training.py

The cross-entropy of ``softmax(z / T)`` has gradients ``(softmax(z / T) - y) / T``: 1/T the size, and
they do not shrink as the model gets the labels right until the logits reach ~T. A learning rate T
times the usual one makes the first step equal to the T = 1 step, but then keeps taking full-size
steps on a loss that stays linear; the unscaled rate makes T times smaller steps. Adam divides each
parameter's step by its gradient's running scale, so the 1/T drops out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_split, log, set_threads, write_report  # noqa: E402

from robustlab.data import ImageDataset  # noqa: E402
from robustlab.models import create_model  # noqa: E402
from robustlab.training import TrainConfig, create_objective, train  # noqa: E402

# (temperature, optimizer, lr, weight decay)
SETTINGS = [
    (1.0, "sgd", 0.05, 5e-4),
    (100.0, "sgd", 0.05, 5e-4),
    (100.0, "sgd", 0.5, 5e-5),
    (100.0, "sgd", 1.5, 5e-5),
    (100.0, "sgd", 5.0, 5e-4),
    (100.0, "sgd", 5.0, 5e-6),
    (100.0, "adam", 1e-3, 0.0),
]


def main() -> None:
    set_threads(1)
    x, y = load_split("mnist", "train")
    data = ImageDataset("mnist", "train", x[:10000], y[:10000], [str(i) for i in range(10)])
    xt, yt = load_split("mnist", "test")
    xt, yt = xt[:2000], yt[:2000]
    lines = ["# Defensive distillation's first network at T = 100: which optimizer settings learn", "", environment(),
             "", "SmallCNN from scratch, 10,000 MNIST training images, 1 epoch (79 steps of 128), cosine schedule; "
             "clean accuracy on the first 2,000 test images at T = 1 (as deployed).", "",
             "| T | optimizer | lr | weight decay | clean accuracy | logit std | last-epoch loss | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t, opt, lr, wd in SETTINGS:
        torch.manual_seed(0)
        model = create_model("smallcnn", num_classes=10)
        c0 = time.process_time()
        history = train(model, data, TrainConfig(epochs=1, batch_size=128, lr=lr, optimizer=opt, weight_decay=wd, seed=0),
                        objective=create_objective("distillation", temperature=t), progress=None)
        seconds = time.process_time() - c0
        model.eval()
        with torch.no_grad():
            z = model(xt)
        acc = float((z.argmax(1) == yt).float().mean())
        lines.append(f"| {t:g} | {opt} | {lr:g} | {wd:g} | {100 * acc:.1f}% | {float(z.std()):.1f} | "
                     f"{history[-1]['loss']:.3f} | {seconds:.0f} |")
        log(lines[-1])
    lines += ["", "The benchmark models (benchmarks/common.py: mnist_distill_t / mnist_distill, cifar_distill_t / "
              "cifar_distill) are therefore trained with Adam at 1e-3, no weight decay.", ""]
    write_report("\n".join(lines), RESULTS / "defenses_trained_distillation.txt")


if __name__ == "__main__":
    main()
