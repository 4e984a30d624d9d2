"""Visual prompts for prompt tuning: a padding frame on the image, and prompt tokens in a ViT.

- :class:`PaddingPrompt` (Bahng et al. 2022, as TeCoA uses it): a learned frame of ``width`` pixels
  added to the preprocessed image.
- :class:`PromptTokens` (VPT, Jia et al. 2022; TeCoA's appended tokens): ``T`` learned tokens appended
  to the token sequence of a ViT image tower, at the input of its first block (shallow; they then flow
  through every block) or fresh at the input of every block (deep, replacing what the previous block
  made of them). They are attached by forward pre-hooks on the tower's blocks, so any ViT works
  without changes to its code: open_clip's, Hugging Face's and the tiny CLIP's. The class token stays
  first, so towers that pool it (all three) read the same position; the tokens carry no position
  embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError


class PaddingPrompt(nn.Module):
    """A learned frame ``width`` pixels wide around a ``size`` x ``size`` image (``channels``), added to
    the preprocessed (normalized) image; zero inside the frame. Starts at zero (the original model)."""

    def __init__(self, size: int, width: int, channels: int = 3) -> None:
        super().__init__()
        if not 0 < 2 * width < size:
            raise RobustlabError(f"a padding prompt of {width} pixels does not fit a {size}x{size} image")
        self.prompt = nn.Parameter(torch.zeros(1, channels, size, size))
        mask = torch.ones(1, 1, size, size)
        mask[..., width:size - width, width:size - width] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.prompt * self.mask).to(x.dtype)


def transformer_blocks(visual: nn.Module) -> tuple[str, nn.ModuleList]:
    """The image tower's transformer blocks: its ``nn.ModuleList`` with the most parameters (open_clip
    ``transformer.resblocks``, Hugging Face ``encoder.layers``, the tiny CLIP's ``blocks``)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in visual.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(p.numel() for p in module.parameters())
            if best is None or n > best[0]:
                best = (n, name, module)
    if best is None:
        raise RobustlabError(f"the image tower ({type(visual).__name__}) has no list of transformer blocks")
    return best[1], best[2]


def _width(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[0])
    raise RobustlabError(f"cannot tell the token width of a {type(block).__name__} block (no LayerNorm in it)")


def _batch_first(block: nn.Module) -> bool:
    """open_clip's blocks may run sequence-first (``nn.MultiheadAttention(batch_first=False)``)."""
    attn = getattr(block, "attn", None)
    return bool(getattr(attn, "batch_first", True))


class PromptTokens(nn.Module):
    """``count`` learned prompt tokens for the ViT ``visual`` (shallow, or ``deep``: one set per block).

    :meth:`attach` registers the hooks on ``visual``'s blocks (done by the constructor);
    :meth:`detach` removes them. Initialized as N(0, 0.02^2) from ``generator``."""

    def __init__(self, visual: nn.Module, count: int, deep: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if count < 1:
            raise RobustlabError(f"the number of prompt tokens must be >= 1, got {count}")
        _, blocks = transformer_blocks(visual)
        width = _width(blocks[0])
        layers = len(blocks) if deep else 1
        ref = next(blocks[0].parameters())
        init = torch.randn(layers, count, width, generator=generator) * 0.02
        self.tokens = nn.Parameter(init.to(ref.device, ref.dtype))
        self.deep = bool(deep)
        self.batch_first = _batch_first(blocks[0])
        self._handles: list[Any] = []
        self.attach(blocks)

    def attach(self, blocks: nn.ModuleList) -> None:
        self.detach()
        for i, block in enumerate(blocks):
            if i == 0 or self.deep:
                self._handles.append(block.register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            x = self._insert(x, i)
            if args:
                return (x, *rest), kwargs
            return rest, {**kwargs, "hidden_states": x}

        return hook

    def _insert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = self.tokens[i].to(x.dtype)
        n = t.shape[0]
        if not self.batch_first:  # (L, N, D)
            t = t.unsqueeze(1).expand(-1, x.shape[1], -1)
            return torch.cat([x, t], dim=0) if i == 0 else torch.cat([x[:-n], t], dim=0)
        t = t.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x, t], dim=1) if i == 0 else torch.cat([x[:, :-n], t], dim=1)
