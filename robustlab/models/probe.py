"""One forward pass before the real work: a model that cannot take the data's images (another
channel count, another image size) fails here with one line that says what it expects and what it
got, instead of a shape error from deep inside a layer. Used by ``train``, ``eval`` (the runner) and
``perturb``: one implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode


def expected_channels(model: nn.Module) -> int | None:
    """The channel count of the model's first convolution (or first linear layer's fan-in is not a
    channel count, so None then); None when the model has no convolution."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
        if isinstance(module, nn.Linear):
            return None
    return None


def _images(c: int) -> str:
    return {1: "1-channel (grey)", 3: "3-channel (RGB)"}.get(c, f"{c}-channel")


def probe_model(model: nn.Module, x: torch.Tensor, *, model_desc: str = "the model", data_desc: str = "the data",
                num_classes: int | None = None, input_size: Sequence[int] | None = None,
                advice: str = "", dense: bool = False) -> torch.Tensor:
    """Run ``model`` (in eval mode, no gradients) on the batch ``x``; return its logits, checked to be
    (N, classes) (``num_classes`` when given). A failure raises one :class:`RobustlabError` line:
    "<model_desc> is built for <C-channel HxW> images; <data_desc> has CxHxW images and the model fails on them
    (<first line of the error>)<advice>". ``input_size`` (H, W) is what the model is built for, when
    known (registry config or model card); the channel count is read from its first convolution.
    ``dense``: a segmentation model, whose logits are per pixel (N, classes, H, W); a model of the
    other kind fails with the one line of :func:`robustlab.checks.check_logits`."""
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        c, h, w = tuple(x.shape[1:4]) if x.dim() == 4 else (x.shape[1], 0, 0)
        channels = expected_channels(model)
        want = []
        if channels is not None:
            want.append(_images(channels))
        if input_size:
            want.append(f"{input_size[0]}x{input_size[1]}")
        takes = f" is built for {' '.join(want)} images" if want else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RobustlabError(f"{model_desc}{takes}; {data_desc} has {c}x{h}x{w} images and the model fails "
                             f"on them ({first}){advice}") from None
    return check_logits(out, x.shape[0], num_classes, dense=dense)
