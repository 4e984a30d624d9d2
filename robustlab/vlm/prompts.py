"""Class names and prompt templates for zero-shot classification.

Named template sets (``TEMPLATE_SETS``): ``photo`` (the "a photo of a {}." family CLIP uses for natural
images), ``digits`` (short prompts for digit images), ``clothing`` (Fashion-MNIST), ``single`` (only
"a photo of a {}.") and ``tecoa`` (the single prompt of TeCoA's evaluation code). Every data set robustlab ships or reads by name has its class names (from
:mod:`robustlab.data.classes`, written as words) and a template set (``DATASET_PROMPTS``).

For any other data (an image folder, other names) give a prompts file:

- JSON: ``{"classes": [...] | {"folder name": "class name", ...}, "templates": [...] | "photo"}``;
  ``classes`` as a list is in label order, as a map it names each class folder; ``templates`` is
  optional (default ``photo``).
- text: one class per line in label order, ``folder name: class name`` to name a folder, and lines
  holding ``{}`` are templates.

An image folder without a prompts file uses its folder names as class names (``_`` read as spaces),
except WordNet ids (``n01440764``), which say nothing to a text encoder: ImageNet-style folders take
their names from the synset mapping file beside them (``LOC_synset_mapping.txt``), else need a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustlab.data.classes import DEFAULT_CLASSES
from robustlab.errors import RobustlabError
from robustlab.vlm.zeroshot import check_templates

TEMPLATE_SETS: dict[str, list[str]] = {
    "single": ["a photo of a {}."],
    "tecoa": ["This is a photo of a {}"],  # the one prompt TeCoA's code evaluates with
    "photo": [
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a low resolution photo of a {}.",
        "a photo of the small {}.",
        "a photo of the large {}.",
        "a close-up photo of a {}.",
        "a cropped photo of the {}.",
        "a pixelated photo of the {}.",
        "a bright photo of a {}.",
        "a dark photo of the {}.",
        "a good photo of a {}.",
        "a rendering of a {}.",
    ],
    "digits": ['a photo of the number: "{}".', "the digit {}.", "a handwritten {}.", "an image of the number {}."],
    "clothing": ["a photo of a {}.", "a photo of the {}, a type of clothing.", "a black and white photo of a {}.",
                 "a low resolution photo of a {}."],
}

#: Class names written for a text encoder where the data set's own labels are not words.
_WORDS: dict[str, list[str]] = {
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"],
}

#: data set name -> template set name
DATASET_PROMPTS: dict[str, str] = {
    "digits": "digits", "mnist": "digits", "svhn": "digits", "fashion_mnist": "clothing",
    "cifar10": "photo", "cifar100": "photo", "imagenet-val": "photo", "imagefolder": "photo",
}

_WNID = re.compile(r"^n\d{8}$")
SYNSET_FILES = ("LOC_synset_mapping.txt", "imagenet_class_index.json")


@dataclass
class Prompts:
    """Class names (label order) and templates of one data set, and where they came from."""

    classnames: list[str]
    templates: list[str]
    source: str = ""

    def config(self) -> dict[str, Any]:
        return {"classnames": list(self.classnames), "templates": list(self.templates), "source": self.source}


def template_set(name: str) -> list[str]:
    """The named template set (a fresh list)."""
    if name not in TEMPLATE_SETS:
        raise RobustlabError(f"unknown template set {name!r}; choose one of: {', '.join(TEMPLATE_SETS)}")
    return list(TEMPLATE_SETS[name])


def words(name: str) -> str:
    """A class label as words: ``_`` as spaces."""
    return name.replace("_", " ").strip()


def prompts_for(dataset: str, classes: list[str], prompts_file: str | Path | None = None,
                templates: list[str] | str | None = None, folder: str | Path | None = None) -> Prompts:
    """Class names and templates for data set ``dataset`` whose labels are ``classes`` (label order,
    as the data set gives them: folder names for image folders). ``prompts_file`` overrides both;
    ``templates`` (a set name or a list) overrides the templates; ``folder`` is where an image
    folder lives (its synset mapping file gives ImageNet names). One error line when a class is not
    covered."""
    key = dataset.strip().lower().replace("-", "_")
    key = "imagenet-val" if key == "imagenet_val" else key
    chosen: list[str] | None = None
    set_name = DATASET_PROMPTS.get(key, "photo")
    if prompts_file is not None:
        names, file_templates = read_prompts_file(prompts_file, classes)
        source = str(prompts_file)
        if file_templates is not None:
            chosen = file_templates
    elif key in DEFAULT_CLASSES and list(classes) == DEFAULT_CLASSES[key]:
        names = list(_WORDS.get(key) or [words(c) for c in classes])
        source = f"robustlab's {key} class names"
    else:
        names, source = _folder_names(dataset, classes, folder)
    if templates is not None:
        chosen = template_set(templates) if isinstance(templates, str) else list(templates)
    chosen = check_templates(chosen if chosen is not None else template_set(set_name))
    return Prompts(names, chosen, source)


def _folder_names(dataset: str, classes: list[str], folder: str | Path | None) -> tuple[list[str], str]:
    wnids = [c for c in classes if _WNID.match(c)]
    if not wnids:
        return [words(c) for c in classes], "the class folder names"
    mapping = _synset_names(Path(folder)) if folder is not None else None
    if mapping is not None:
        path, names = mapping
        missing = [c for c in classes if c not in names]
        if missing:
            raise RobustlabError(f"image folder classes {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                                 f"({len(missing)} of {len(classes)}) are not named in {path}; give --prompts FILE")
        return [names[c] for c in classes], str(path)
    raise RobustlabError(f"class names missing for data set {dataset!r}: its classes are WordNet ids "
                         f"({classes[0]}, ...) and no synset mapping file ({', '.join(SYNSET_FILES)}) is beside it; "
                         "give --prompts FILE with one class name per line")


def _synset_names(folder: Path) -> tuple[Path, dict[str, str]] | None:
    """wnid -> first human name, from a synset mapping file in ``folder`` or its parents (up to two)."""
    for place in (folder, folder.parent, folder.parent.parent):
        for name in SYNSET_FILES:
            path = place / name
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                index = json.loads(text)
                return path, {str(v[0]): words(str(v[1])) for v in index.values()}
            out = {}
            for line in text.splitlines():
                wnid, _, rest = line.strip().partition(" ")
                if wnid and rest:
                    out[wnid] = rest.split(",")[0].strip()
            return path, out
    return None


def read_prompts_file(path: str | Path, classes: list[str]) -> tuple[list[str], list[str] | None]:
    """(class names in label order, templates or None) from a prompts file (see the module
    docstring), checked against the data's ``classes``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RobustlabError(f"prompts file {path} does not exist")
    text = p.read_text(encoding="utf-8")
    templates: list[str] | None = None
    if p.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise RobustlabError(f"prompts file {p} is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or "classes" not in doc:
            raise RobustlabError(f"prompts file {p} needs a \"classes\" entry (a list in label order, or a map "
                                 "from class folder to class name)")
        given = doc["classes"]
        t = doc.get("templates")
        if t is not None:
            templates = template_set(t) if isinstance(t, str) else check_templates(t)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        templates = [line for line in lines if "{}" in line] or None
        rest = [line for line in lines if "{}" not in line]
        pairs = [line.partition(":") for line in rest]
        given = {k.strip(): v.strip() for k, sep, v in pairs} if rest and all(sep for _, sep, _ in pairs) else rest
    if isinstance(given, dict):
        missing = [c for c in classes if c not in given]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise RobustlabError(f"image folder classes {', '.join(missing[:3])}{more} are not covered by the prompts "
                                 f"in {p}; add a line 'FOLDER: class name' for each")
        return [str(given[c]) for c in classes], templates
    if not isinstance(given, list) or len(given) != len(classes):
        n = len(given) if isinstance(given, list) else 0
        raise RobustlabError(f"prompts file {p} names {n} classes but the data has {len(classes)}; give one name per "
                             "class in label order, or 'FOLDER: class name' lines")
    return [str(c) for c in given], templates
