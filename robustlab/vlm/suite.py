"""The data sets of a zero-shot evaluation: each with its images, class names, templates and the
zero-shot head built from them (text embeddings computed once, here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustlab.data import Dataset, load_dataset, resize_center_crop
from robustlab.data.image_folder import data_fingerprint, parse_folder_spec
from robustlab.errors import RobustlabError
from robustlab.vlm.base import VisionLanguageModel
from robustlab.vlm.prompts import Prompts, prompts_for
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier


@dataclass
class ZeroShotSet:
    """One data set of a zero-shot evaluation: ``key`` (its name in the run), the data, its prompts
    and the zero-shot classifier over them."""

    key: str
    data: Dataset
    prompts: Prompts
    head: ZeroShotClassifier

    def describe(self) -> dict[str, Any]:
        """What the run's configuration records about it (hashed: a resumed run must match)."""
        out = {"dataset": self.key, "split": self.data.split, "n": len(self.data),
               "image_shape": list(self.data.image_shape), **self.prompts.config()}
        fingerprint = data_fingerprint(self.data)
        if fingerprint is not None:
            out["data_fingerprint"] = fingerprint
        return out


def parse_data_list(text: str) -> list[str]:
    """``mnist,cifar10,imagenet-val:DIR`` -> the specs, in order, without repeats."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise RobustlabError("give at least one data set, e.g. --data digits,mnist,cifar10")
    return list(dict.fromkeys(specs))


def load_set_data(spec: str, split: str, root: str | Path | None, image_size: int,
                  at_model_size: bool = False) -> tuple[str, Dataset, Path | None]:
    """(key, data, folder) for one data spec: a named data set at its own resolution (the model resizes
    it, after the attack), or with ``at_model_size`` resized to the model's ``image_size`` batch by
    batch before the attack (as TeCoA's evaluation does); an image folder is always streamed from disk
    and resized + centre-cropped to ``image_size`` (so batches stack; epsilons then hold at the model's
    resolution)."""
    folder = parse_folder_spec(spec)
    if folder is None:
        key = spec.strip().lower().replace("-", "_")
        if at_model_size:
            return key, load_dataset(spec, split, root=root, transform=resize_center_crop(image_size), stream=True), None
        return key, load_dataset(spec, split, root=root), None
    name, path = folder
    data = load_dataset(name, split if name == "imagefolder" else "val", root=path,
                        transform=resize_center_crop(image_size), stream=True)
    key = "imagenet-val" if name == "imagenet-val" else Path(path).resolve().name
    return key, data, Path(path)


def build_sets(vlm: VisionLanguageModel, specs: list[str], *, split: str = "test", root: str | Path | None = None,
               n: int | None = None, prompts: dict[str, str] | None = None,
               templates: str | list[str] | None = None, at_model_size: bool = False) -> list[ZeroShotSet]:
    """The zero-shot sets for data ``specs``: each data set (its first ``n`` images), its class
    names and templates (``prompts``: key or spec -> prompts file; ``templates``: a template set name
    or list for all), and its head. ``at_model_size``: named data sets are resized to the model's input
    size before the attack (see :func:`load_set_data`)."""
    prompts = dict(prompts or {})
    sets: list[ZeroShotSet] = []
    for spec in specs:
        key, data, folder = load_set_data(spec, split, root, vlm.image_size, at_model_size)
        if any(s.key == key for s in sets):
            raise RobustlabError(f"data set {key!r} is given twice")
        if n is not None:
            data = data.subset(n)
        file = prompts.pop(key, None) or prompts.pop(spec, None)
        p = prompts_for(key if folder is None else ("imagenet-val" if key == "imagenet-val" else "imagefolder"),
                        list(data.classes), file, templates, folder)
        head = ZeroShotClassifier(vlm, text_classifier(vlm, p.classnames, p.templates))
        sets.append(ZeroShotSet(key, data, p, head))
    if prompts:
        raise RobustlabError(f"--prompts for {', '.join(prompts)}, which is not among the data sets "
                             f"({', '.join(s.key for s in sets)})")
    return sets
