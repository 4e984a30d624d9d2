"""Contrastive pretraining of the tiny CLIP (:mod:`robustlab.vlm.tiny_clip`) on captioned images.

Captions are class names x prompt templates ("a photo of a {}." with "cat"): every image of class c
of data set d is captioned, at each step, by one of d's templates (drawn at random) filled with c's
name. The images of all data sets are brought to one size and 3 channels and pooled into one
:class:`~robustlab.data.ImageDataset` whose labels are global caption classes (data set, class), so
pretraining runs in robustlab's one training loop (checkpoints, ``--resume``, progress, AMP) with
the :class:`ClipContrastive` objective.

The loss is CLIP's symmetric image-text cross-entropy with a learned temperature. Captions repeat
within a batch (many images of one class), so every caption of the same class counts as a positive:
the target of each row is uniform over the batch's entries of its class (a multi-positive CLIP loss;
with all classes distinct it is exactly CLIP's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from robustlab.data import Dataset, ImageDataset
from robustlab.errors import RobustlabError
from robustlab.training import TrainConfig, TrainHistory, train
from robustlab.training.objectives import Objective
from robustlab.vlm.base import resize_square
from robustlab.vlm.tiny_clip import TinyCLIP, TinyCLIPConfig, build_vocab
from robustlab.vlm.zeroshot import check_templates, fill


@dataclass
class CaptionSource:
    """One data set to pretrain on, with the class names and templates its captions are made of."""

    name: str
    data: Dataset
    classnames: list[str]
    templates: list[str]


def caption_sources(specs: Sequence[str], split: str = "train", root: str | Path | None = None,
                    prompts: dict[str, str] | None = None, templates: str | list[str] | None = None,
                    image_size: int = 32) -> list[CaptionSource]:
    """The caption sources for data ``specs`` (named data sets read from ``root``, or image folders
    resized to ``image_size``), each with robustlab's class names and templates for it, or those of
    ``prompts`` (key or spec -> prompts file) and ``templates`` (a template set name or list for all)."""
    from robustlab.vlm.prompts import prompts_for
    from robustlab.vlm.suite import load_set_data, parse_data_list

    prompts = dict(prompts or {})
    sources: list[CaptionSource] = []
    for spec in parse_data_list(",".join(specs)):
        key, data, folder = load_set_data(spec, split, root, image_size)
        if any(s.name == key for s in sources):
            raise RobustlabError(f"data set {key!r} is given twice")
        p = prompts_for(key, list(data.classes), prompts.pop(key, None) or prompts.pop(spec, None), templates, folder)
        sources.append(CaptionSource(key, data, p.classnames, p.templates))
    if prompts:
        raise RobustlabError(f"--prompts names {', '.join(sorted(prompts))}, which is not among the data sets")
    return sources


def caption_dataset(sources: Sequence[CaptionSource], image_size: int, per_source: int | None = None,
                    seed: int = 0) -> tuple[ImageDataset, list[list[str]]]:
    """The pooled training set (3 x ``image_size`` x ``image_size`` images in [0, 1], labels = global
    caption class) and, per global class, its captions (every template filled with the class name).
    Classes of different sources with the same captions (MNIST's and the digits' "3") are one class.
    ``per_source``: at most this many images from each source (a seeded random subset)."""
    xs, ys, prompts, names = [], [], [], []
    for src in sources:
        templates = check_templates(src.templates)
        if len(src.classnames) != src.data.num_classes:
            raise RobustlabError(f"{src.name}: {len(src.classnames)} class names for {src.data.num_classes} classes")
        n = len(src.data)
        idx = torch.arange(n)
        if per_source is not None and per_source < n:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[:per_source].sort().values
        x, y = src.data.batch(idx)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        xs.append(resize_square(x, image_size, "bilinear").contiguous())
        ids = []
        for c in src.classnames:
            captions = [fill(t, c) for t in templates]
            if captions not in prompts:  # the same captions (mnist and digits) are the same class
                prompts.append(captions)
                names.append(f"{src.name}:{c}")
            ids.append(prompts.index(captions))
        ys.append(torch.tensor(ids)[y])
    tag = "+".join(s.name for s in sources)
    return ImageDataset(f"captions({tag})", "train", torch.cat(xs), torch.cat(ys), names), prompts


class ClipContrastive(Objective):
    """The symmetric CLIP loss of images against one caption each (drawn from its class's
    ``prompts``), with every same-class caption in the batch a positive. The model is a
    :class:`~robustlab.vlm.tiny_clip.TinyCLIP` (its learned temperature is trained too).
    Logs ``clean_acc``: the share of images whose most similar caption in the batch is a positive."""

    name = "clip-contrastive"
    model_kind = "vision-language"
    adversarial = False
    defaults: ClassVar[dict[str, Any]] = {"prompts": []}

    def validate(self) -> None:
        if not self.params["prompts"] or not all(self.params["prompts"]):
            raise RobustlabError("recipe 'clip-contrastive' needs prompts: a non-empty list of captions per class")

    def loss(self, model, x, y, generator):
        prompts = self.params["prompts"]
        draws = torch.randint(0, 1 << 30, (len(y),), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        labels = y.tolist()
        captions = [prompts[c][d % len(prompts[c])] for c, d in zip(labels, draws)]
        img = F.normalize(model.encode_image(x).float(), dim=-1)
        txt = F.normalize(model.encode_text(captions).float(), dim=-1)
        logits = model.scale_tensor() * img @ txt.T
        positive = (y[:, None] == y[None, :]).float()
        target = positive / positive.sum(dim=1, keepdim=True)
        loss = 0.5 * (soft_cross_entropy(logits, target) + soft_cross_entropy(logits.T, target))
        hit = positive.gather(1, logits.detach().argmax(dim=1, keepdim=True)).mean()
        return loss, {"clean_acc": hit}


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (rows of ``target`` sum to 1), batch mean."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def pretrain_tiny_clip(
    sources: Sequence[CaptionSource],
    config: TinyCLIPConfig | None = None,
    train_config: TrainConfig | None = None,
    per_source: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TinyCLIP, TrainHistory, dict[str, Any]]:
    """A tiny CLIP pretrained on ``sources`` (Adam, cosine schedule by default); returns the model
    (eval mode), the loop's history and a JSON description of the training (for the card). The
    vocabulary is every word of every caption. Seeded by ``train_config.seed``. ``checkpoint_dir`` /
    ``resume`` / ``on_epoch``: the training loop's (a resumed run ends with the weights of an
    uninterrupted one)."""
    config = config or TinyCLIPConfig()
    train_config = train_config or TrainConfig(epochs=10, batch_size=128, lr=2e-3, optimizer="adam",
                                               weight_decay=1e-4, warmup_epochs=0.5)
    data, prompts = caption_dataset(sources, config.image_size, per_source, seed=train_config.seed)
    torch.manual_seed(train_config.seed)
    model = TinyCLIP(config, build_vocab([p for ps in prompts for p in ps]))
    objective = ClipContrastive(prompts=prompts)
    history = train(model, data, train_config, objective, device=device, progress=progress,
                    checkpoint_dir=checkpoint_dir, resume=resume, on_epoch=on_epoch)
    model.eval()
    described = {
        "objective": "multi-positive CLIP loss, learned temperature",
        "sources": [{"name": s.name, "images": min(len(s.data), per_source or len(s.data)),
                     "classes": list(s.classnames), "templates": list(s.templates)} for s in sources],
        "train_config": train_config.to_dict(),
        "history": list(history),
    }
    return model, history, described
