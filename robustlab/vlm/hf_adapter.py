"""Hugging Face transformers' ``CLIPModel`` behind the :class:`~robustlab.vlm.base.VisionLanguageModel`
seam, read from a local folder (``save_pretrained`` layout: config.json, weights, tokenizer files,
optionally preprocessor_config.json) with ``local_files_only``: nothing is downloaded.
Install with ``pip install 'robustlab[vlm]'`` (transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.vlm.base import CLIP_MEAN, CLIP_STD, VisionLanguageModel


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise RobustlabError("Hugging Face CLIP models need transformers: pip install 'robustlab[vlm]' "
                             f"(import failed: {exc})") from None
    return transformers


def _features(out: Any) -> torch.Tensor:
    """The projected embeddings of ``get_image_features`` / ``get_text_features`` (a tensor in
    transformers 4, an output object with them as ``pooler_output`` in 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFVisualTower(nn.Module):
    """The image tower of a ``CLIPModel``: its vision transformer and the projection into the joint
    space (what ``get_image_features`` computes), as one module for adaptation to train."""

    def __init__(self, vision_model: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_model(pixel_values=x).pooler_output)


class HFClipVLM(VisionLanguageModel):
    """A transformers ``CLIPModel`` (``model``) with its tokenizer; mean / std / size from the
    folder's image processor settings when given, else the model config's size and CLIP's statistics."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int | None = None,
                 mean: Any = CLIP_MEAN, std: Any = CLIP_STD, name: str = "") -> None:
        super().__init__(image_size or int(model.config.vision_config.image_size), mean, std)
        self.clip = model
        # not registered: its parts already are, under clip (the state dict holds every tensor once)
        object.__setattr__(self, "_visual", HFVisualTower(model.vision_model, model.visual_projection))
        self.tokenizer = tokenizer
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.name = name

    @property
    def visual(self) -> nn.Module:
        return self._visual

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return _features(self.clip.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                     attention_mask=enc["attention_mask"].to(self.device)))

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())


def load_hf_clip(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> HFClipVLM:
    """The ``CLIPModel`` saved in ``folder`` with its tokenizer, from local files only."""
    transformers = _transformers()
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise RobustlabError(f"{folder}: not a Hugging Face model folder (no config.json); save one with "
                             "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR). Nothing is downloaded")
    try:
        model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RobustlabError(f"{folder}: cannot load a CLIPModel from it ({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise RobustlabError(f"{folder}: no tokenizer files (vocab.json and merges.txt, or tokenizer.json) "
                             f"({str(exc).splitlines()[0]})") from None
    size, mean, std = None, CLIP_MEAN, CLIP_STD
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        cfg = json.loads(proc.read_text(encoding="utf-8"))
        crop = cfg.get("crop_size")
        size = crop.get("height") if isinstance(crop, dict) else crop
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    model.eval()
    return HFClipVLM(model, tokenizer, size, mean, std, name=str(path)).to(device)
