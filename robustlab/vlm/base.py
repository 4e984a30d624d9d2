"""The vision-language model seam: what robustlab needs from a CLIP-like model.

A :class:`VisionLanguageModel` takes images in [0, 1] (NCHW, any size, 1 or 3 channels) and does its
own preprocessing (resize to ``image_size``, then per-channel normalization) differentiably, inside
the model, so an attack perturbs pixels in [0, 1] *before* the resize and epsilons mean what they mean
everywhere else in robustlab. Adapters (:mod:`robustlab.vlm.open_clip_adapter`,
:mod:`robustlab.vlm.hf_adapter`) and robustlab's own small models subclass it and implement
:meth:`~VisionLanguageModel.encode_preprocessed` and :meth:`~VisionLanguageModel.encode_text`.

Adaptation (TeCoA, prompt tuning, FARE) trains ``visual``, the image tower; the text tower is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.normalize import Normalize

#: CLIP's preprocessing statistics (OpenAI CLIP, open_clip's default), in [0, 1] pixel units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_square(x: torch.Tensor, size: int, mode: str = "bicubic", crop: bool = True) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) resized so the shorter side is ``size``, then centre-cropped to
    ``size`` x ``size`` (CLIP's Resize + CenterCrop; ``crop=False``: squashed to the square),
    differentiably, with antialiased (PIL-like) kernels; bicubic overshoot is clamped back into [0, 1].
    Images already ``size`` x ``size`` pass unchanged."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = (max(size, round(h * scale)), max(size, round(w * scale))) if crop else (size, size)
    smooth = mode in ("bilinear", "bicubic")  # antialiased kernels: PIL's (as CLIP's own preprocessing)
    out = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False if smooth else None, antialias=smooth)
    if mode == "bicubic":
        out = out.clamp(0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[..., top:top + size, left:left + size]


class VisionLanguageModel(nn.Module):
    """A CLIP-like model: an image tower and a text tower embedding into one D-dimensional space.

    Attributes: ``image_size`` (the side the image tower takes), ``mean`` / ``std`` (its
    normalization, tuples in [0, 1] units), ``visual`` (the image tower: what adaptation trains),
    ``channels`` (3 for CLIP; 1-channel inputs are repeated to 3), ``resize_mode`` (the
    interpolation, bicubic for CLIP) and ``crop`` (shorter side + centre crop, else squash).
    Subclasses set ``visual`` (or define it as a property returning a tower registered elsewhere in
    the model: every tensor should appear once in the state dict, which safetensors requires) and
    implement :meth:`encode_preprocessed`, :meth:`encode_text` and :attr:`logit_scale`.
    """

    visual: nn.Module

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 channels: int = 3, resize_mode: str = "bicubic", crop: bool = True) -> None:
        super().__init__()
        if int(image_size) < 1:
            raise RobustlabError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.resize_mode = resize_mode
        self.crop = bool(crop)
        self.normalize = Normalize(mean, std)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the model's normalization, in [0, 1] pixel units."""
        return tuple(self.normalize.mean.flatten().tolist())

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the model's normalization, in [0, 1] pixel units."""
        return tuple(self.normalize.std.flatten().tolist())

    @property
    def device(self) -> torch.device:
        """Where the model's parameters (or buffers) live."""
        for t in self.parameters():
            return t.device
        return self.normalize.mean.device

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, C, H, W; any H, W; C 1 or ``channels``) -> the image tower's input:
        grey repeated to ``channels``, resized to ``image_size`` (shorter side + centre crop),
        normalized. Differentiable, so attacks perturb the [0, 1] pixels before all of this."""
        if x01.dim() != 4:
            raise RobustlabError(f"images must be N x C x H x W in [0, 1], got shape {tuple(x01.shape)}")
        c = x01.shape[1]
        if c != self.channels:
            if c != 1:
                raise RobustlabError(f"the model takes {self.channels}-channel (or grey) images, got {c} channels")
            x01 = x01.expand(-1, self.channels, -1, -1)
        x01 = resize_square(x01, self.image_size, self.resize_mode, self.crop)
        return self.normalize(x01)

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of images already preprocessed (:meth:`preprocess`)."""
        raise NotImplementedError

    def encode_image(self, x01: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of images in [0, 1] (preprocessed here); not normalized to unit length."""
        return self.encode_preprocessed(self.preprocess(x01))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (T, D) of ``texts`` (tokenized here, on the model's device); not normalized."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """The temperature that multiplies cosine similarities into logits (CLIP: exp of its learned
        log-scale, 100 for trained models)."""
        raise NotImplementedError
