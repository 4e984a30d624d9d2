"""The training loop. An objective maps (model, x, y) to a scalar loss; standard training is
cross-entropy, and adversarial recipes plug in their own objective."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from robustlab.checks import check_logits
from robustlab.data import ImageDataset
from robustlab.errors import RobustlabError
from robustlab.models.mode import eval_mode
from robustlab.seeding import make_generator

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def standard_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(check_logits(model(x), x.shape[0]), y)


@dataclass
class TrainConfig:
    """Optimizer and schedule. lr is the peak learning rate; schedule ``cosine`` or ``constant``."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9) | adam
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise RobustlabError("epochs and batch size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RobustlabError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise RobustlabError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise RobustlabError(f"schedule must be cosine or constant, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 512, device: torch.device | None = None) -> float:
    """Clean accuracy of ``model`` on ``data`` (eval mode, caller's modes restored)."""
    device = device or next(model.parameters()).device
    correct = 0
    with eval_mode(model), torch.no_grad():
        for _, _, x, y in data.batches(batch_size):
            correct += int((model(x.to(device)).argmax(dim=1) == y.to(device)).sum())
    return correct / len(data)


def train(
    model: nn.Module,
    data: ImageDataset,
    config: TrainConfig,
    objective: Objective = standard_objective,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``data``; returns one dict per epoch (mean loss, seconds)."""
    config.validate()
    device = torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(data), generator=make_generator(config.seed, epoch))
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=(not progress) if progress is not None else None, leave=False)
        for i in bar:
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            loss = objective(model, x, y)
            if not torch.isfinite(loss):
                raise RobustlabError(f"the training loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        model.eval()
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "seconds": round(time.perf_counter() - t0, 3)}
        history.append(record)
        if on_epoch:
            on_epoch(record)
    model.eval()
    return history
