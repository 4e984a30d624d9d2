"""The runtime a model is evaluated and attacked in, without mutating it: eval mode for the duration
(the caller's per-module modes restored), and on CPU the speed context :func:`fast_runtime` (a faster
memory layout and subnormal weights read as zero, for the duration, the caller's tensors restored).

Attacks do not apply the speed context themselves: the evaluation runner and the CLI wrap a whole
run in :func:`fast_runtime`, and so should a Python user who calls ``attack.run`` directly::

    with fast_runtime(model, x[:64]) as info:   # info: {"channels_last": bool, "subnormal_weights_zeroed": int}
        result = attack.run(model, x, y, generator)
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn


def training_modules(model: nn.Module) -> list[str]:
    """Names of submodules in train mode whose behaviour depends on it (dropout, batch norm)."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)
    return [name or type(m).__name__ for name, m in model.named_modules() if m.training and isinstance(m, kinds)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c)


# Whether fast_runtime may switch a model to channels-last on CPU (see channels_last);
# ROBUSTLAB_CHANNELS_LAST=0 in the environment, or setting this to False, runs every model as given.
FAST_LAYOUT = os.environ.get("ROBUSTLAB_CHANNELS_LAST", "1") != "0"
# Models found not to work channels-last by a probe (not tried again).
UNSAFE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def channels_last(model: nn.Module, x: torch.Tensor, enabled: bool | None = None) -> Iterator[bool]:
    """Run a convolutional model in channels-last memory format for the duration, where that is safe;
    yields whether it does. The caller's tensors are put back on exit (the very same objects).

    On CPU, oneDNN convolutions and max-pooling run channels-last much faster than the default
    layout (forward passes about 1.6x, forward + backward about 1.25x for SmallCNN and cifar_cnn on
    the development machine); the numbers are the same up to float rounding. Only 4-D parameters and
    buffers change layout. It is used only if a forward pass on ``x`` (a batch of inputs; the probe,
    two forward passes in eval mode) still works and gives the same logits (models that ``view``
    their activations fail in this layout). CUDA and other devices are left alone: their fastest
    layout depends on dtype and hardware. ``enabled=None`` follows :data:`FAST_LAYOUT`.
    """
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.dim() == 4]
    use = ((FAST_LAYOUT if enabled is None else enabled) and model not in UNSAFE
           and x.dim() == 4 and x.device.type == "cpu"
           and any(isinstance(m, nn.Conv2d) for m in model.modules())
           and not all(t.stride() == _channels_last_strides(t.shape) for t in tensors))
    saved = [(t, t.data) for t in tensors]
    if use:
        with eval_mode(model), torch.no_grad():
            reference = model(x)
            for t in tensors:
                # Not .contiguous(): with one channel a tensor counts as channels-last already and
                # stays as it is, and the convolution it feeds then runs in the default layout.
                t.data = torch.empty_like(t.data, memory_format=torch.channels_last).copy_(t.data)
            try:
                out = model(x)
                use = (out.shape == reference.shape and torch.allclose(
                    out, reference, rtol=1e-4, atol=1e-4 * max(1.0, float(reference.abs().max()))))
            except RuntimeError:  # e.g. view() on a channels-last activation
                use = False
        if not use:
            UNSAFE.add(model)
            for t, data in saved:
                t.data = data
    try:
        yield use
    finally:
        for t, data in saved:
            t.data = data


def subnormals(t: torch.Tensor) -> torch.Tensor:
    """Where a floating tensor holds subnormal numbers (``0 < |v| < finfo.tiny``)."""
    a = t.detach().abs()
    return (a > 0) & (a < torch.finfo(t.dtype).tiny)


def _with_subnormals(tensors: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(tensor, mask, count) for each floating CPU tensor that holds subnormal numbers."""
    found = []
    for t in tensors:
        if t.is_floating_point() and t.device.type == "cpu":
            mask = subnormals(t)
            n = int(mask.sum())
            if n:
                found.append((t, mask, n))
    return found


def zero_subnormals_(tensors: Iterable[torch.Tensor]) -> int:
    """Set the subnormal entries of floating CPU tensors to zero, in place; returns how many."""
    found = _with_subnormals(tensors)
    with torch.no_grad():
        for t, mask, _ in found:
            t.masked_fill_(mask, 0.0)
    return sum(n for _, _, n in found)


# Whether fast_runtime reads subnormal weights as zero (see subnormal_weights_zeroed);
# ROBUSTLAB_ZERO_SUBNORMALS=0 in the environment, or setting this to False, runs every model as given.
ZERO_SUBNORMALS = os.environ.get("ROBUSTLAB_ZERO_SUBNORMALS", "1") != "0"


@contextlib.contextmanager
def subnormal_weights_zeroed(model: nn.Module, enabled: bool | None = None) -> Iterator[int]:
    """Run a model whose parameters or buffers hold subnormal numbers with those entries zero, for
    the duration; yields how many there are. The caller's tensors are put back on exit (the very same
    objects and values).

    Weight decay drives the weights of units that stop learning (dead ReLUs) towards zero through
    the subnormal range, where they stay for hundreds of thousands of steps: adversarially trained
    MNIST SmallCNNs here hold 6,000-13,000 of them. CPUs compute with subnormal operands many
    times slower (a matrix product here: 114 ms instead of 1.3 ms), which made those models' forward
    passes about 25% slower. A weight below 1.2e-38 changes no sum of ordinary magnitude in float32,
    so the logits are the same. Only CPU tensors are touched: GPUs handle subnormals at full speed.
    ``enabled=None`` follows :data:`ZERO_SUBNORMALS`; when off, nothing is touched and 0 is yielded.
    """
    on = ZERO_SUBNORMALS if enabled is None else enabled
    found = _with_subnormals([*model.parameters(), *model.buffers()]) if on else []
    saved = [(t, t.data) for t, _, _ in found]
    with torch.no_grad():
        for t, mask, _ in found:
            t.data = t.data.clone().masked_fill_(mask, 0.0)  # clone keeps the memory layout
    count = sum(n for _, _, n in found)
    try:
        yield count
    finally:
        for t, data in saved:
            t.data = data


@contextlib.contextmanager
def fast_runtime(model: nn.Module, probe_x: torch.Tensor) -> Iterator[dict[str, Any]]:
    """The CPU speed context of an evaluation or of direct attack calls: ``model`` channels-last
    where a probe forward pass on ``probe_x`` shows that safe (:func:`channels_last`), and its
    subnormal weights read as zero (:func:`subnormal_weights_zeroed`), for the duration; the caller's
    tensors are put back on exit. Logits inside equal the model's as given up to float rounding.
    Yields what was applied:
    ``{"channels_last": bool, "subnormal_weights_zeroed": int}``."""
    with channels_last(model, probe_x) as fast, subnormal_weights_zeroed(model) as zeroed:
        yield {"channels_last": fast, "subnormal_weights_zeroed": zeroed}


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full float32 for the duration; the caller's
    settings are put back on exit.

    On NVIDIA GPUs since Ampere, PyTorch runs float32 convolutions in TF32 by default (a 10-bit
    mantissa, relative errors near 1e-3). A robustness number is about the model as defined, in
    float32: an adversarial point found, or verified, on TF32 logits can be classified differently in
    float32 when its margin is small. Other devices are unaffected (the flags only concern CUDA).
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
