"""What commands that evaluate a model share about their inputs: the weights options of ``--model``
and data that take the model's preprocessing (image folders resized and cropped as the model expects)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robustlab.data import Dataset
    from robustlab.models import ModelCard



def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--num-classes`` for architectures given by name."""
    parser.add_argument("--weights", metavar="FILE",
                        help="weights for a torchvision:/timm:/robustbench: or registry architecture: safetensors, or "
                        "a state dict saved with torch.save (read with weights_only=True); nothing is downloaded")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="classes the architecture is built for (default 1000 for torchvision/timm, 10 for "
                        "registry names); must match the weights")


def declared_strength(text: str) -> dict[str, str]:
    """``--stronger-than 'standard: why'`` -> {"at_least": "standard", "reason": "why"}."""
    from robustlab.attacks.suites import SUITES
    from robustlab.errors import RobustlabError

    suite, sep, reason = text.partition(":")
    suite, reason = suite.strip(), reason.strip()
    if not sep or not reason:
        raise RobustlabError(f"write SUITE: WHY (e.g. 'standard: 1000-step adaptive PGD'), got {text!r}")
    SUITES.get(suite)  # the clear unknown-name error
    return {"at_least": suite, "reason": reason}


def check_data_spec(spec: str) -> None:
    """Fail on an unknown data set name or a missing folder before a model is loaded."""
    from robustlab.data import DATASETS
    from robustlab.data.image_folder import parse_folder_spec

    if parse_folder_spec(spec) is None:
        DATASETS.get(spec.strip().lower().replace("-", "_"))


def load_data_for_model(spec: str, split: str, root: str | None, card: ModelCard | None) -> Dataset:
    """The data of ``--data``: a named data set, or an image folder streamed through the model's
    resize/crop (``transform_for_model`` of its card's preprocessing, when the card has an input size)."""
    from robustlab.data import load_dataset, transform_for_model
    from robustlab.data.image_folder import parse_folder_spec

    folder = parse_folder_spec(spec)
    if folder is None:
        return load_dataset(spec, split, root=root)
    name, path = folder
    transform = transform_for_model(card.preprocessing) if card is not None and card.input_size else None
    return load_dataset(name, split if name == "imagefolder" else "val", root=path, transform=transform, stream=True)
