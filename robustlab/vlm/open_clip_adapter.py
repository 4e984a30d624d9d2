"""open_clip models behind the :class:`~robustlab.vlm.base.VisionLanguageModel` seam.

``load_open_clip(name, weights)`` builds architecture ``name`` (a name open_clip knows, e.g.
``ViT-B-32`` or ``ViT-B-32-quickgelu`` for OpenAI's weights) and loads a checkpoint from a local
file: safetensors, a state dict saved with ``torch.save`` (read with ``weights_only=True``), or a
TorchScript archive as OpenAI's ``clip`` package ships (``ViT-B-32.pt``), read by open_clip's own
:func:`open_clip.load_openai_model` (only its tensors are kept; the archive's code is never run), with
the architecture built with QuickGELU as every OpenAI CLIP model is.
Nothing is downloaded: pretrained tags (``openai``, ``laion2b_s34b_b79k``) and ``hf-hub:`` names are
refused, and so are models whose tokenizer would come from the Hugging Face hub.
Install with ``pip install 'robustlab[vlm]'`` (open-clip-torch).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.vlm.base import CLIP_MEAN, CLIP_STD, VisionLanguageModel


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise RobustlabError("open_clip models need open-clip-torch: pip install 'robustlab[vlm]' "
                             f"(import failed: {exc})") from None
    return open_clip


def _side(size: Any) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise RobustlabError(f"non-square image towers ({tuple(size)}) are not supported")
        size = size[0]
    return int(size)


class OpenClipVLM(VisionLanguageModel):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` model (``model``) with its tokenizer.

    Preprocessing comes from the model: ``image_size`` from its image tower, mean / std, the
    interpolation and squash-or-crop from its ``preprocess_cfg`` when it has one (else CLIP's; a
    ``longest``-side resize with padding is done as shorter side + crop). ``visual`` is the image
    tower (``clip.visual``, so the state dict holds every tensor once); the text tower stays in ``clip``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str = "") -> None:
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        interpolation = cfg.get("interpolation", "bicubic")
        super().__init__(_side(model.visual.image_size), cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD),
                         resize_mode="bilinear" if interpolation == "bilinear" else "bicubic",
                         crop=cfg.get("resize_mode", "shortest") != "squash")
        self.clip = model
        if tokenizer is None:
            context = int(getattr(model, "context_length", 77) or 77)
            tokenizer = _open_clip().tokenizer.SimpleTokenizer(context_length=context)
        self.tokenizer = tokenizer
        self.name = name

    @property
    def visual(self) -> nn.Module:  # the open_clip model's own image tower (registered once, under clip)
        return self.clip.visual

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.clip.encode_text(tokens)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())


def check_local_name(name: str) -> str:
    """``name`` if it is an architecture open_clip knows locally; ``hf-hub:`` names (downloads) and
    unknown names are refused in one line."""
    open_clip = _open_clip()
    name = name.strip()
    if name.startswith("hf-hub:"):
        raise RobustlabError(f"open_clip model {name!r} would be downloaded from the Hugging Face hub; robustlab "
                             "never downloads weights: give an architecture name (e.g. ViT-B-32) and --weights FILE")
    if name.startswith("local-dir:"):
        return name
    if open_clip.get_model_config(name) is None:
        known = [m for m in open_clip.list_models() if m.startswith("ViT-B-")][:6]
        raise RobustlabError(f"open_clip knows no architecture {name!r}; e.g. {', '.join(known)} "
                             "(`python -c 'import open_clip; print(open_clip.list_models())'` lists all)")
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg") or {}
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise RobustlabError(f"open_clip model {name!r} takes its text tower or tokenizer from the Hugging Face hub "
                             "(a download); use an architecture with open_clip's own text tower (e.g. ViT-B-32)")
    return name


def load_open_clip(name: str, weights: str | os.PathLike[str] | None = None,
                   device: str | torch.device = "cpu") -> OpenClipVLM:
    """open_clip architecture ``name`` with the checkpoint ``weights`` (a local file; None: random
    initialisation, for tests). A checkpoint that does not fit the architecture is refused in one
    line that says how many keys differ and the first of them."""
    open_clip = _open_clip()
    name = check_local_name(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise RobustlabError(f"open_clip checkpoint {str(weights)!r} is not a file; robustlab never downloads "
                                 "weights (pretrained tags such as 'openai' are not accepted): give a local .safetensors, "
                                 ".pt or .bin file")
    openai_archive = weights is not None and is_torchscript_archive(path)
    model = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_image=False,
                                   pretrained_text=False, device="cpu", force_quick_gelu=openai_archive)
    if openai_archive:
        load_openai_archive_into(model, path, name)
    elif weights is not None:
        load_checkpoint_into(model, path, name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name) if not name.startswith("local-dir:") else None
    return OpenClipVLM(model, tokenizer, name).to(device)


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``constants.pkl`` record), the format of
    the ``.pt`` files OpenAI's ``clip`` package downloads, rather than a state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())


def load_openai_archive_into(model: nn.Module, path: Path, name: str) -> None:
    """Load OpenAI's TorchScript archive ``path`` into the open_clip ``model`` (architecture ``name``):
    open_clip reads it (:func:`open_clip.load_openai_model`: its tensors, float16 in OpenAI's files,
    into a float32 CLIP), then its state dict loads strictly; one error line when the archive is no
    CLIP model or not one of architecture ``name``."""
    open_clip = _open_clip()
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            source = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise RobustlabError(f"{path} is a TorchScript archive but not an OpenAI CLIP model open_clip can read "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    state = source.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise RobustlabError(mismatch_line(model.state_dict(), state, path, name)) from None


def load_checkpoint_into(model: nn.Module, path: Path, name: str) -> None:
    """Load ``path`` into the open_clip ``model`` (open_clip's own conversions: ``module.`` prefixes,
    old text layouts, position-embedding resizing), strictly; mismatches are one error line."""
    open_clip = _open_clip()
    try:
        state = open_clip.factory.load_state_dict(str(path), weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        # a file that is no checkpoint, or a pickle that holds more than tensors
        raise RobustlabError(f"{path}: cannot read it as a checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not state:
        raise RobustlabError(f"{path}: holds no state dict of tensors")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError):
        raise RobustlabError(mismatch_line(model.state_dict(), state, path, name)) from None


def mismatch_line(expected: dict[str, torch.Tensor], found: dict[str, Any], path: Path | str, name: str) -> str:
    """One line: which keys of a checkpoint do not fit the model (missing, unexpected, wrong shape)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and hasattr(found[k], "shape")
              and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (first: {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in the model)")
    what = "; ".join(parts) or "its tensors do not load"
    return f"checkpoint {path} does not match open_clip architecture {name!r}: {what}; is it a checkpoint of that model?"
