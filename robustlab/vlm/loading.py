"""One entry point for vision-language models by spec, ``KIND:REST``: ``open_clip:NAME`` (with
``weights``, a local checkpoint) or ``hf:FOLDER`` (a saved transformers CLIPModel). Other kinds
plug in with :func:`register_vlm_loader`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from robustlab.errors import RobustlabError
from robustlab.vlm.base import VisionLanguageModel

#: (rest of the spec, weights file or None, device) -> (model, info); info: source, spec, weights_sha256
VLMLoader = Callable[[str, "str | None", "str | torch.device"], tuple[VisionLanguageModel, dict[str, Any]]]
VLM_LOADERS: dict[str, VLMLoader] = {}
VLM_SPECS = "open_clip:NAME (with --weights FILE) or hf:FOLDER (a saved transformers CLIPModel)"


def register_vlm_loader(kind: str, help_text: str) -> Callable[[VLMLoader], VLMLoader]:
    """Decorator: ``kind:REST`` specs are loaded by the decorated function."""

    def wrap(fn: VLMLoader) -> VLMLoader:
        global VLM_SPECS
        VLM_LOADERS[kind] = fn
        if kind not in ("open_clip", "hf"):
            VLM_SPECS += f", {help_text}"
        return fn

    return wrap


def load_vlm(spec: str, weights: str | os.PathLike[str] | None = None,
             device: str | torch.device = "cpu") -> tuple[VisionLanguageModel, dict[str, Any]]:
    """(model, info) for ``spec`` (see ``VLM_SPECS``); info records the source, spec and the sha256
    of the weights (the leaderboard's model identity)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest.strip():
        raise RobustlabError(f"vision-language model {spec!r}: write {VLM_SPECS}")
    kind = kind.strip().lower().replace("-", "_")
    kind = "hf" if kind == "huggingface" else kind
    if kind not in VLM_LOADERS:
        raise RobustlabError(f"unknown vision-language model kind {kind!r} in {spec!r}; write {VLM_SPECS}")
    model, info = VLM_LOADERS[kind](rest.strip(), None if weights is None else str(weights), device)
    return model, {"spec": spec, **info}


@register_vlm_loader("open_clip", "open_clip:NAME[:FILE]")
def _open_clip(name: str, weights: str | None, device: str | torch.device) -> tuple[VisionLanguageModel, dict[str, Any]]:
    from robustlab.models.checkpoint import sha256_file
    from robustlab.vlm.open_clip_adapter import load_open_clip

    arch, sep, path = name.partition(":")
    if sep and arch != "local-dir":  # open_clip:NAME:FILE, the weights in the spec
        if weights is not None:
            raise RobustlabError(f"open_clip:{name} names its weights file; leave out --weights")
        name, weights = arch, path
    if weights is None:
        raise RobustlabError(f"open_clip:{name} needs --weights FILE (or open_clip:NAME:FILE), a local open_clip "
                             "checkpoint (nothing is downloaded)")
    model = load_open_clip(name, weights, device)
    return model, {"source": "open_clip", "weights": weights, "weights_sha256": sha256_file(weights)}


@register_vlm_loader("hf", "hf:FOLDER")
def _hf(folder: str, weights: str | None, device: str | torch.device) -> tuple[VisionLanguageModel, dict[str, Any]]:
    from robustlab.models.checkpoint import sha256_file
    from robustlab.vlm.hf_adapter import load_hf_clip

    if weights is not None:
        raise RobustlabError("hf:FOLDER takes its weights from the folder; leave out --weights")
    model = load_hf_clip(folder, device)
    root = os.path.expanduser(folder)
    files = sorted(p for p in os.listdir(root) if p.endswith((".safetensors", ".bin")))
    return model, {"source": "huggingface", "weights_sha256": sha256_file(os.path.join(root, files[0])) if files else None}
