"""The third-party MNIST model of issue 20: a LeNet-like network (two 3x3 conv layers of 32 and 64
channels, each followed by ReLU and 2x2 max-pooling, a 200-unit hidden layer), standard training.

``get_lenet()`` trains it once (Adam, 1 epoch on the 60,000 MNIST training images, ~1-2 min on two
CPU cores) and caches the weights under ``benchmarks/.cache/lenet_mnist.safetensors``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CACHE, load_split, log

RECIPE = "adam lr 1e-3, batch 128, 1 epoch"


def lenet_like(num_classes: int = 10) -> nn.Module:
    """conv3x3(32)-relu-pool2, conv3x3(64)-relu-pool2, fc 200-relu, fc classes (28x28 grayscale input)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 200), nn.ReLU(), nn.Linear(200, num_classes),
    )


def get_lenet(seed: int = 0, subset: int = 0) -> nn.Module:
    """The trained model in eval mode (trained on first use, then loaded from the cache). ``seed`` and
    ``subset`` (first training images; 0: all) make other members of the family, e.g. a transfer target."""
    from safetensors.torch import load_file, save_file

    tag = "" if (seed, subset) == (0, 0) else f"_s{seed}_n{subset}"
    path = CACHE / f"lenet_mnist{tag}.safetensors"
    model = lenet_like()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x, y = load_split("mnist", "train")
    if subset:
        x, y = x[:subset], y[:subset]
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for idx in torch.randperm(len(y), generator=gen).split(128):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = load_split("mnist", "test")
    with torch.no_grad():
        acc = (model(xt[:2000]).argmax(1) == yt[:2000]).float().mean().item()
    log(f"[lenet_mnist{tag}] trained in {time.perf_counter() - t0:.0f} s ({RECIPE}, seed {seed}, {len(y)} images); clean accuracy {acc:.4f} "
        "on the first 2000 test images")
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


if __name__ == "__main__":
    get_lenet()


def correct_test_images(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the first ``n`` MNIST test images that ``model`` classifies correctly."""
    x, y = load_split("mnist", "test")
    x, y = x[:n], y[:n]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok], y[ok]

