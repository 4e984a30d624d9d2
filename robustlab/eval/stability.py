"""Stability of a model under perturbation sequences (ImageNet-P): flip probability, top-5 distance,
and against a baseline FR, mFR and mT5D (see :mod:`robustlab.corruptions.perturbations`)."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from robustlab.corruptions.perturbations import (
    PERTURBATION_SUITE,
    create_perturbation,
    sequence_stability,
)
from robustlab.eval.metrics import FlipRate
from robustlab.models.runtime import eval_mode
from robustlab.seeding import make_generator


def perturbation_stability(model: torch.nn.Module, data: Any, names: list[str] | tuple[str, ...] = PERTURBATION_SUITE,
                           *, frames: int = 31, seed: int = 0, batch_size: int = 64,
                           baseline: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """FP, uT5D (and against ``baseline``: FR, mFR, mT5D) of ``model`` on ``data`` (a Dataset) under
    each perturbation of ``names``, sequences of ``frames`` frames, batch by batch, each batch's
    draws from (seed, perturbation, batch)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    metric = FlipRate()
    with eval_mode(model):
        for name in names:
            p = create_perturbation(name, frames=frames)
            for b, start in enumerate(range(0, len(data), batch_size)):
                x, _ = data.batch(range(start, min(start + batch_size, len(data))))
                gen = make_generator(seed, zlib.crc32(name.encode()), b, device=device)
                out = sequence_stability(model, x.to(device), p, gen)
                metric.update(name, out["flips"].tolist(), out["t5d"].tolist(), out["pairs"].tolist())
    return metric.compute(baseline)
