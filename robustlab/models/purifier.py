"""Purifier networks (Naseer et al. 2020, "A self-supervised approach for adversarial robustness"):
image-to-image networks that map a (possibly perturbed) image in [0, 1] to a purified image in [0, 1]
of the same shape, for any channel count.

Two architectures, registered by name in :data:`PURIFIERS`:

- ``residual`` (default, small): a 3x3 conv to ``width`` channels, ``blocks`` residual blocks
  (conv-LeakyReLU-conv plus skip, no normalization), a 3x3 conv back to the image's channels; the
  output is the input plus that correction, clipped to [0, 1]. The last conv starts at zero, so an
  untrained purifier is the identity. (The paper's ``NRP_resG`` is this shape at width 64, 23 blocks.)
- ``dense``: residual-in-residual dense blocks (``blocks`` of them, each three densely connected
  five-conv blocks with growth ``growth``), the paper's ``NRP`` at a smaller width and depth.

A purifier is saved as a robustlab checkpoint (``X.safetensors`` + card ``X.json``): the card's entry
point is :func:`build_purifier` with the architecture, channels and options as its arguments, and its
``training`` field records the image size, training data, feature network and layer, losses and
epochs (:func:`save_purifier`). :func:`load_purifier` reads one back, verified by sha256.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.registry import Registry

ENTRY_POINT = "robustlab.models.purifier:build_purifier"
PURIFIERS: Registry[Callable[..., nn.Module]] = Registry("purifier architecture")


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output; scaled residual."""

    def __init__(self, width: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(width + i * growth, growth, 3, padding=1) for i in range(4))
        self.last = nn.Conv2d(width + 4 * growth, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, dim=1))))
        return x + 0.2 * self.last(torch.cat(feats, dim=1))


class _RRDB(nn.Module):
    def __init__(self, width: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_DenseBlock(width, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class Purifier(nn.Module):
    """``clip(x + last(trunk(first(x))), 0, 1)``: the shared shape of both architectures. ``channels``
    is the image's channel count (input and output)."""

    def __init__(self, channels: int, width: int, trunk: nn.Module, act_first: bool) -> None:
        super().__init__()
        self.channels = channels
        self.first = nn.Conv2d(channels, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.1) if act_first else nn.Identity()
        self.trunk = trunk
        self.last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.last.weight)  # an untrained purifier is the identity
        nn.init.zeros_(self.last.bias)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """``x + correction`` before the clip to [0, 1] (training's pixel loss reads it: a pixel pushed
        outside the box gets no gradient through the clip, and a purifier whose output left the box
        everywhere could never come back)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise RobustlabError(
                f"the purifier takes images with {self.channels} channel(s) (N, {self.channels}, H, W), "
                f"got shape {tuple(x.shape)}")
        return x + self.last(self.trunk(self.act(self.first(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x).clamp(0.0, 1.0)


@PURIFIERS.register("residual")
def residual_purifier(channels: int, width: int = 32, blocks: int = 4) -> nn.Module:
    """The small residual purifier (default): ``blocks`` residual blocks at ``width`` channels."""
    return Purifier(channels, width, nn.Sequential(*(_ResidualBlock(width) for _ in range(blocks))), act_first=True)


@PURIFIERS.register("dense")
def dense_purifier(channels: int, width: int = 32, blocks: int = 2, growth: int = 16) -> nn.Module:
    """The denser purifier: ``blocks`` residual-in-residual dense blocks at ``width`` channels."""
    return Purifier(channels, width, nn.Sequential(*(_RRDB(width, growth) for _ in range(blocks))), act_first=False)


def build_purifier(architecture: str = "residual", channels: int = 3, **options: Any) -> nn.Module:
    """The purifier ``architecture`` (a name in :data:`PURIFIERS`) for images of ``channels``
    channels, with its ``options`` (width, blocks, growth); fresh weights. The cards' entry point."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise RobustlabError(f"purifier channels must be a positive integer, got {channels!r}")
    factory = PURIFIERS.get(architecture)
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RobustlabError(f"purifier {architecture!r}: {key} must be a positive integer, got {value!r}")
    try:
        return factory(channels, **options)
    except TypeError:
        import inspect

        known = [p for p in inspect.signature(factory).parameters if p != "channels"]
        raise RobustlabError(f"purifier {architecture!r} takes the options {', '.join(known)}; got "
                             f"{', '.join(sorted(options))}") from None


def save_purifier(purifier: nn.Module, path: str | os.PathLike[str], architecture: str, options: dict[str, Any],
                  image_size: tuple[int, int], training: dict[str, Any], dataset: str = "", notes: str = "") -> Path:
    """Write ``purifier`` as ``X.safetensors`` with its card ``X.json`` (see the module docstring);
    ``training`` holds the feature network and layer, losses, epochs and so on. Returns the weights path."""
    from robustlab.models.card import ModelCard
    from robustlab.models.checkpoint import save_checkpoint

    channels = int(purifier.channels)
    card = ModelCard.for_entry_point(
        ENTRY_POINT, {"architecture": architecture, "channels": channels, **options},
        in_channels=channels, preprocessing={"input_size": [int(image_size[0]), int(image_size[1])]},
        dataset=dataset, training={"purifier": True, **training}, notes=notes or "robustlab purifier (NRP)")
    return save_checkpoint(purifier, path, card)


def load_purifier(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """A purifier saved by :func:`save_purifier` (eval mode, on ``device``) and its card. A file that
    is not a purifier checkpoint fails with one line."""
    from robustlab.models.checkpoint import card_path, load_checkpoint, read_card

    p = Path(path).expanduser()
    if p.suffix not in (".safetensors", ".json"):
        p = p.with_name(p.name + ".safetensors")
    if not p.with_suffix(".safetensors").is_file():
        raise RobustlabError(f"purifier file not found: {p.with_suffix('.safetensors')}")
    card = read_card(p.with_suffix(".safetensors"))
    if card.entry_point != ENTRY_POINT:
        raise RobustlabError(f"{p} is not a purifier (its card {card_path(p)} builds {card.builder}); "
                             f"write one with `robustlab purify train`")
    model, card = load_checkpoint(p.with_suffix(".safetensors"), device=device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval(), card
