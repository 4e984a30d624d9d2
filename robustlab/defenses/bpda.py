"""Building blocks of defended models for adaptive attacks (Athalye, Carlini & Wagner 2018, "Obfuscated
gradients give a false sense of security").

- :func:`bpda` (Backward Pass Differentiable Approximation): a module that applies a
  non-differentiable (or gradient-masking) function in the forward pass and, in the backward pass,
  the gradient of a differentiable surrogate of it, by default the identity (straight-through).
- :class:`Pipeline`: a defense (preprocessing) followed by the model, as one ``nn.Module``, so every
  attack sees, and differentiates through, the whole defended system.

EOT (expectation over transformation) for randomized defenses is the shared loop
:func:`robustlab.attacks.base.eot_gradient`; the attacks that take gradients expose its draws as an
``eot`` parameter. A registered defense (:mod:`robustlab.defenses.base`) uses these pieces itself;
they stay public for defenses written in Python.

Example, a quantizing defense attacked with straight-through gradients::

    defended = Pipeline(bpda(lambda x: torch.round(x * 3) / 3), model)
    create_attack("pgd", ThreatModel("linf", 0.1)).run(defended, x, y)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from robustlab.errors import RobustlabError

TensorFn = Callable[[torch.Tensor], torch.Tensor]


class _BPDAFunction(torch.autograd.Function):
    """Forward: ``forward_fn(x)`` (no graph). Backward: the vector-Jacobian product of
    ``backward_fn`` at ``x`` (identity when None)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_fn: TensorFn, backward_fn: TensorFn | None) -> torch.Tensor:
        with torch.no_grad():
            out = forward_fn(x)
        if not isinstance(out, torch.Tensor):
            raise RobustlabError(f"bpda: forward_fn must return a tensor, got {type(out).__name__}")
        if backward_fn is None and out.shape != x.shape:
            raise RobustlabError(
                f"bpda: forward_fn changes the shape {tuple(x.shape)} -> {tuple(out.shape)}; the straight-through "
                "gradient needs the same shape (give a differentiable backward_fn of the same shape change)"
            )
        ctx.backward_fn = backward_fn
        ctx.out_shape = out.shape
        ctx.save_for_backward(x)
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.backward_fn is None:
            return grad_out, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_req = x.detach().requires_grad_(True)
            approx = ctx.backward_fn(x_req)
            if approx.shape != ctx.out_shape:
                raise RobustlabError(
                    f"bpda: backward_fn gives shape {tuple(approx.shape)}, forward_fn {tuple(ctx.out_shape)}; "
                    "they must agree"
                )
            (grad,) = torch.autograd.grad(approx, x_req, grad_out, allow_unused=True)
        return (torch.zeros_like(x) if grad is None else grad), None, None


class BPDA(nn.Module):
    """``forward_fn`` forward, the gradient of ``backward_fn`` (identity if None) backward. Module
    arguments are registered as submodules, so ``.to()``, ``.eval()`` and ``state_dict`` reach them."""

    def __init__(self, forward_fn: TensorFn, backward_fn: TensorFn | None = None) -> None:
        super().__init__()
        if not callable(forward_fn):
            raise RobustlabError(f"bpda: forward_fn must be callable, got {type(forward_fn).__name__}")
        if backward_fn is not None and not callable(backward_fn):
            raise RobustlabError(f"bpda: backward_fn must be callable or None, got {type(backward_fn).__name__}")
        self.forward_fn = forward_fn
        self.backward_fn = backward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BPDAFunction.apply(x, self.forward_fn, self.backward_fn)

    def extra_repr(self) -> str:
        backward = "identity (straight-through)" if self.backward_fn is None else _describe(self.backward_fn)
        return f"forward={_describe(self.forward_fn)}, backward={backward}"


def bpda(forward_fn: TensorFn, backward_fn: TensorFn | None = None) -> BPDA:
    """A module computing ``forward_fn(x)`` whose backward pass is the gradient of ``backward_fn``, a
    differentiable approximation of ``forward_fn`` (``None``: the identity, i.e. straight-through,
    for preprocessing that keeps the image close to its input, such as quantization or denoising)."""
    return BPDA(forward_fn, backward_fn)


class Pipeline(nn.Module):
    """``model(defense(x))``: a preprocessing defense and the model it protects, attacked as one model.
    Both are submodules (``pipeline.defense``, ``pipeline.model``), so eval mode and devices reach both."""

    def __init__(self, defense: TensorFn, model: nn.Module) -> None:
        super().__init__()
        if not callable(defense) or not callable(model):
            raise RobustlabError("Pipeline(defense, model): both must be callables mapping tensors to tensors")
        self.defense = defense
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.defense(x))


def _describe(fn: Any) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
