"""Learning-rate schedules as pure functions of the optimizer step, so a resumed run gets exactly the
learning rates of an uninterrupted one.

Every schedule returns a factor of the peak learning rate. An optional linear warm-up multiplies in
front of it over the first ``warmup_steps`` steps; the schedule proper then runs over the remaining
steps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from robustlab.errors import RobustlabError

SCHEDULES = ("cosine", "constant", "multistep", "cyclic")


def lr_factor(
    schedule: str,
    step: int,
    total: int,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    peak: float = 0.4,
) -> float:
    """The factor of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    cosine: ``0.5 * (1 + cos(pi * t))`` with ``t`` the fraction of the (post-warm-up) run done;
    constant: 1; multistep (piecewise constant): ``gamma ** k`` after the k-th milestone (milestones
    are fractions of the whole run, e.g. 0.5 and 0.75 as in Madry et al. / Rice et al.); cyclic: the
    one-cycle triangle of Wong et al. 2020 (0 -> 1 at fraction ``peak`` -> 0 at the end).
    """
    total = max(1, int(total))
    step = min(max(0, int(step)), total)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        frac = step / total
        return float(gamma) ** sum(1 for m in milestones if frac >= m)
    span = max(1, total - warmup_steps)
    done = min(step - warmup_steps, span)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done / span))
    t = done / span
    if schedule == "cyclic":
        return t / peak if t < peak else max(0.0, (1.0 - t) / (1.0 - peak))
    raise RobustlabError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def make_lr_lambda(
    schedule: str, total: int, warmup_steps: int = 0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
) -> Callable[[int], float]:
    """``lr_factor`` with the schedule's settings bound, for ``torch.optim.lr_scheduler.LambdaLR``."""
    if schedule not in SCHEDULES:
        raise RobustlabError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    bound = tuple(float(m) for m in milestones)

    def factor(step: int) -> float:
        return lr_factor(schedule, step, total, warmup_steps, bound, gamma)

    return factor


def linear_ramp(progress: float, start: float, end: float) -> float:
    """A factor in [0, 1]: 0 until the fraction ``start`` of the run, 1 from ``end`` on, linear in
    between (the epsilon ramp of certified training, Gowal et al. 2018; Zhang et al. 2020)."""
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return (progress - start) / (end - start)
