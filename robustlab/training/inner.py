"""Inner maximizations of adversarial training that the attack API does not offer as such.

The evaluation attacks (``robustlab.attacks``) stop spending compute on a sample once it is
misclassified and keep its first successful iterate: right for measuring robustness, wrong for
training, where Madry et al., TRADES and MART run every step to maximize the loss itself. These
helpers run all steps, on any per-sample loss of the logits (cross-entropy, the TRADES KL, ...), with
the geometry of :class:`~robustlab.threat.ThreatModel` (random starts, steepest steps, projection);
nothing here re-implements projection.

Like the attacks, they run the model in eval mode (so BatchNorm statistics do not drift and dropout
is off), restore the caller's modes, and differentiate with respect to the input only: no parameter
gradient is computed or accumulated.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab import losses
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel, norms

LogitLoss = Callable[[torch.Tensor], torch.Tensor]  # logits (N, K) -> per-sample loss (N,) to maximize

STARTS = ("uniform", "normal", "none")


def start_point(
    x: torch.Tensor, threat: ThreatModel, start: str, generator: torch.Generator | None, sigma: float = 0.001
) -> torch.Tensor:
    """Where the ascent starts: ``uniform`` in the ball (Madry et al.; Wong et al.), ``normal`` as
    ``x + sigma * N(0, 1)`` (TRADES and MART, sigma 0.001), projected into the threat model, or
    ``none`` (the clean point)."""
    if start == "uniform":
        return threat.random_init(x, generator)
    if start == "normal":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return threat.project(x + sigma * noise, x)
    return x.clone()


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with the memory layout (strides) of ``like``. Iterates built by elementwise ops come out
    in the default layout; a clean batch may be stored otherwise (e.g. channels-last, as images read
    from HWC arrays are), and convolutions run different, and differently fast, kernels on each. The
    attack's forward passes should cost what the training step's do."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: LogitLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (detached) at ``x`` and the gradient of ``loss_fn(logits).sum()`` with respect to ``x``
    only (the model is called in whatever mode it is in)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        (grad,) = torch.autograd.grad(loss_fn(logits).sum(), x)
    return logits.detach(), grad


def maximize(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: LogitLoss,
    threat: ThreatModel,
    steps: int,
    alpha: float,
    start: str | torch.Tensor = "uniform",
    generator: torch.Generator | None = None,
    l1_sparsity: float = 0.95,
) -> torch.Tensor:
    """Projected steepest ascent of ``loss_fn`` for exactly ``steps`` steps of size ``alpha`` (in the
    threat model's norm) from ``start`` (a name of :data:`STARTS`, or a starting batch); returns the
    last iterate (inside ``threat``), detached.

    With ``steps=1``, ``start="uniform"`` and ``alpha=1.25 * eps`` this is the FGSM-with-random-start
    step of Wong et al. 2020.
    """
    x = x.detach()
    with eval_mode(model):
        if isinstance(start, torch.Tensor):
            x_adv = start.detach()
        else:
            x_adv = start_point(x, threat, start, generator)
        x_adv = same_layout(x_adv, x)
        for _ in range(steps):
            _, grad = input_gradient(model, x_adv, loss_fn)
            x_adv = same_layout(threat.project(x_adv + threat.steepest_step(grad, alpha, x_adv, l1_sparsity), x), x)
    return x_adv.detach()


def cross_entropy_loss(y: torch.Tensor) -> LogitLoss:
    """Per-sample cross-entropy of the labels ``y`` (the loss PGD-AT, MART and fast AT maximize);
    per-pixel labels (N, H, W): the mean over each sample's pixels (:func:`robustlab.losses.per_sample`)."""
    return lambda logits: losses.cross_entropy(logits.float(), y)


def kl_to(probs: torch.Tensor) -> LogitLoss:
    """Per-sample ``KL(probs || softmax(logits))``: the TRADES inner objective, with ``probs`` the
    (fixed) clean prediction."""
    return lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), probs, reduction="none").sum(dim=1)


def virtual_adversarial_direction(
    model: nn.Module,
    x: torch.Tensor,
    probs: torch.Tensor,
    xi: float,
    iterations: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The dominant direction of the KL divergence's curvature at ``x`` (VAT, Miyato et al. 2018),
    by ``iterations`` power iterations with finite-difference probes of L2 size ``xi`` from a random
    Gaussian start. ``probs`` is the (fixed) prediction at ``x``. Returns an unnormalized direction
    (N, C, H, W); the caller scales it to the threat model with ``steepest_step``. Eval mode."""
    x = x.detach()
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    loss_fn = kl_to(probs)
    shape = (-1, *[1] * (x.dim() - 1))
    # Float32 probes even under autocast: a probe of 1e-6 vanishes in float16.
    with eval_mode(model), torch.autocast(x.device.type, enabled=False):
        for _ in range(iterations):
            unit = d / norms(d, "l2").clamp_min(1e-12).view(shape)
            # The gradient with respect to the probe point equals the one with respect to d (up to
            # the constant xi), and only its direction is used.
            _, d = input_gradient(model, same_layout(x + xi * unit, x), loss_fn)
    return d
