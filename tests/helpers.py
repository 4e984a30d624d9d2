"""Small helpers shared by the tests (import as ``from helpers import ...``; pytest puts the tests
folder on the path)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from robustlab.threat import ThreatModel

# A model that is not in the registry: user code reached through an entry point (tiny_net.py:build).
TINY_NET = """
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.body(x)


def build(width=16):
    return TinyNet(width)
"""


def save_tiny_net(folder: Path, width: int = 12, defense: list | None = None) -> tuple[nn.Module, Path]:
    """Write tiny_net.py into ``folder``, build ``build(width=width)`` (seed 0, eval mode) and save it
    as ``folder/tiny.safetensors`` with an entry-point card (behind ``defense`` if given).
    Returns (model, weights path)."""
    from robustlab.models import ModelCard, save_checkpoint
    from robustlab.models.entry_points import build_from_entry_point

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_net.py").write_text(TINY_NET)
    torch.manual_seed(0)
    spec = f"{folder / 'tiny_net.py'}:build"
    model = build_from_entry_point(spec, {"width": width}).eval()
    card = ModelCard.for_entry_point(spec, {"width": width}, num_classes=10, in_channels=1, dataset="digits:train",
                                     preprocessing={"input_size": [8, 8]})
    if defense:
        card = card.with_defense(defense)
    return model, save_checkpoint(model, folder / "tiny.safetensors", card)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's predicted classes, without a graph."""
    with torch.no_grad():
        return model(x).argmax(dim=1)


def linear_digits_classifier(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear softmax classifier trained on ``(x, y)`` in float64, where the smallest misclassifying
    perturbations are known exactly: (model, its first ``k`` correctly classified images, their labels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = x.double()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    correct = (predict(model, x) == y).nonzero()[:k, 0]
    return model, x[correct], y[correct]


def robust_fraction(result) -> float:
    """The fraction of an AttackResult's samples the attack did not break."""
    return float((~result.success).float().mean())


class Recorder(nn.Module):
    """Wraps a model and counts, per clean sample, every forward pass (``forwards``), those that
    build a graph to the input (``gradients``), and the forward count at which the model first
    misclassified the sample (``first_wrong``, -1: never). Each queried image is attributed to the
    nearest clean image in the Lp distance ``matching(threat)``, which is unambiguous when the clean
    images are more than twice the largest perturbation apart in it (see ``separated``)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> None:
        super().__init__()
        self.model, self.ref, self.y = model, x.flatten(1), y
        self.p = matching(threat)[0]
        n = len(y)
        self.forwards = torch.zeros(n, dtype=torch.long)
        self.gradients = torch.zeros(n, dtype=torch.long)
        self.first_wrong = torch.full((n,), -1, dtype=torch.long)
        self.queried: dict[tuple[int, int], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        with torch.no_grad():
            who = torch.cdist(x.detach().flatten(1), self.ref, p=self.p).argmin(1)
            assert who.unique().numel() == who.numel()  # one query per sample and call
            self.forwards[who] += 1
            if x.requires_grad:
                self.gradients[who] += 1
            wrong = (out.argmax(1) != self.y[who]) & (self.first_wrong[who] < 0)
            self.first_wrong[who[wrong]] = self.forwards[who[wrong]]
            for i, k in zip(who[wrong].tolist(), wrong.nonzero(as_tuple=True)[0].tolist()):
                self.queried[(i, int(self.forwards[i]))] = x[k].detach().clone()
        return out


def matching(threat: ThreatModel, dim: int = 64) -> tuple[float, float]:
    """(p, radius): the distance that attributes queries to clean images, and the largest distance
    of a point of the threat model from its image in it (Linf balls are matched in L2, which is fast)."""
    if threat.norm == "linf":
        return 2.0, threat.eps * math.sqrt(dim)
    return (2.0 if threat.norm == "l2" else 1.0), threat.eps


def separated(x: torch.Tensor, threat: ThreatModel, n: int) -> torch.Tensor:
    """Indices of up to n images pairwise more than twice the largest perturbation of ``threat``
    apart (greedy), so that every point of an image's ball is nearest to that image."""
    flat = x.flatten(1)
    p, radius = matching(threat, flat.shape[1])
    d = torch.cdist(flat, flat, p=p)
    keep: list[int] = []
    for i in range(len(x)):
        if all(d[i, j] > 2 * radius + 1e-3 for j in keep):
            keep.append(i)
    return torch.tensor(keep[:n])
