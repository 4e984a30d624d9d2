"""The zero-shot head: class names x prompt templates -> a linear classifier on image embeddings.

``text_classifier`` averages, per class, the unit-normalized text embeddings of the class name in
every template, and normalizes the average again (CLIP's prompt ensembling). ``ZeroShotClassifier``
is an ordinary robustlab model (images in [0, 1] -> logits), so attacks, evaluation and training use
it like any other classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.vlm.base import VisionLanguageModel


def check_templates(templates: Sequence[str]) -> list[str]:
    """``templates`` as a list, each with a ``{}`` slot for the class name; else one error line."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise RobustlabError("no prompt templates given; give at least one, e.g. 'a photo of a {}.'")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise RobustlabError(f"prompt template {t!r} has no '{{}}' slot for the class name; "
                                 f"write it like 'a photo of a {{}}.'")
    return templates


def fill(template: str, classname: str) -> str:
    """The prompt for ``classname``: every ``{}`` of ``template`` replaced by it."""
    return template.replace("{}", classname)


def text_classifier(vlm: VisionLanguageModel, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot weights (C, D), one unit-length row per class: the class's prompts (every template
    filled with its name) encoded, each unit-normalized, averaged, re-normalized. Computed once, in
    eval mode and without gradient; float32 on the model's device."""
    templates = check_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise RobustlabError("no class names given for the zero-shot classifier")
    return prompt_classifier(vlm, [[fill(t, name) for t in templates] for name in classnames])


def prompt_classifier(vlm: VisionLanguageModel, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Zero-shot weights (C, D) from each class's own list of prompts (``prompts[c]``), averaged and
    normalized as :func:`text_classifier` does. One head over the classes of several data sets, each
    with its own templates (e.g. the pooled caption classes of
    :func:`robustlab.vlm.pretrain.caption_dataset`)."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise RobustlabError("no classes given for the zero-shot classifier")
    empty = [c for c, p in enumerate(prompts) if not p]
    if empty:
        raise RobustlabError(f"class {empty[0]} has no prompts; give at least one prompt per class")
    rows = []
    with torch.no_grad(), eval_mode(vlm):
        for texts in prompts:
            emb = vlm.encode_text(texts).float()
            mean = F.normalize(emb, dim=-1).mean(dim=0)
            rows.append(F.normalize(mean, dim=-1))
    return torch.stack(rows)


class ZeroShotClassifier(nn.Module):
    """Logits ``logit_scale * normalize(encode_image(x01)) @ weights.T`` for images in [0, 1].

    ``weights`` (C, D) come from :func:`text_classifier` (a buffer: saved with the state dict, follows
    ``.to``). The image is perturbed in [0, 1] before the model's own resize and normalization.
    """

    weights: torch.Tensor

    def __init__(self, vlm: VisionLanguageModel, weights: torch.Tensor) -> None:
        super().__init__()
        if weights.dim() != 2:
            raise RobustlabError(f"zero-shot weights must be (classes, dim), got shape {tuple(weights.shape)}")
        self.vlm = vlm
        self.register_buffer("weights", weights.detach().clone())

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.vlm.encode_image(x01), dim=-1)
        return self.vlm.logit_scale * emb @ self.weights.to(emb.dtype).T
