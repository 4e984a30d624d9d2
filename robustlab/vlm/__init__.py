"""Vision-language models: CLIP-like models behind one seam (``VisionLanguageModel``), adapters for
open_clip and Hugging Face transformers, and the zero-shot head that makes them ordinary classifiers."""

from robustlab.vlm.base import CLIP_MEAN, CLIP_STD, VisionLanguageModel, resize_square
from robustlab.vlm.zeroshot import (
    ZeroShotClassifier,
    check_templates,
    fill,
    text_classifier,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VisionLanguageModel",
    "ZeroShotClassifier",
    "check_templates",
    "fill",
    "resize_square",
    "text_classifier",
]
