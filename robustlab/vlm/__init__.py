"""Vision-language models: CLIP-like models behind one seam (``VisionLanguageModel``), adapters for
open_clip and Hugging Face transformers, and the zero-shot head that makes them ordinary classifiers."""

from robustlab.vlm.base import CLIP_MEAN, CLIP_STD, VisionLanguageModel, resize_square
from robustlab.vlm.zeroshot import (
    ZeroShotClassifier,
    check_templates,
    fill,
    prompt_classifier,
    text_classifier,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VisionLanguageModel",
    "ZeroShotClassifier",
    "check_templates",
    "fill",
    "prompt_classifier",
    "resize_square",
    "text_classifier",
]

# Importing these modules registers the tiny CLIP and adapted-model loaders (load_vlm kinds ``tiny``
# and ``adapted``) and the ``tecoa`` and ``fare`` training recipes.
from robustlab.vlm import adapt as _adapt  # noqa: F401
from robustlab.vlm import objectives as _objectives  # noqa: F401
from robustlab.vlm import tiny_clip as _tiny_clip  # noqa: F401
