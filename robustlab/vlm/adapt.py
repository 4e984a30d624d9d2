"""Adapting a vision-language model's image tower for zero-shot robustness: what trains, and the run.

Modes (``parse_mode``):

- ``full``: every parameter of the image tower (``vlm.visual``) trains.
- ``last:blocks=K``: only the last K transformer blocks of the image tower train, with the head after
  them (final norm, projection). The blocks are the tower's largest ``nn.ModuleList`` (open_clip
  ``transformer.resblocks``, Hugging Face ``encoder.layers``, the tiny CLIP's ``blocks``); the head
  is known by name (:data:`HEAD_NAMES`).
- ``vpt:pad=P,tokens=T,deep=false``: visual prompt tuning, the model's own weights frozen. ``pad``: a
  learned padding prompt, a frame of P pixels around the preprocessed image, added to it (Bahng et al.
  2022, as in TeCoA); ``tokens``: T learned prompt tokens appended to the ViT's token sequence
  (shallow: at the input; deep: at every block, Jia et al. 2022), by hooks on the tower's blocks, so
  open_clip, Hugging Face and tiny-CLIP towers all take them (:mod:`robustlab.vlm.visual_prompts`).

The text tower never trains: the training classes' text embeddings are computed once
(:func:`~robustlab.vlm.zeroshot.text_classifier`) into the zero-shot classifier that the loop trains.
Only the chosen parameters require gradients, so the optimizer holds only them and the attack inside a
step differentiates with respect to the input alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.params import parse_spec
from robustlab.training import TrainConfig, TrainHistory, train
from robustlab.training.objectives import Objective
from robustlab.vlm.base import VisionLanguageModel
from robustlab.vlm.loading import register_vlm_loader
from robustlab.vlm.visual_prompts import PaddingPrompt, PromptTokens, transformer_blocks
from robustlab.vlm.zeroshot import ZeroShotClassifier, text_classifier

MODES = ("full", "last", "vpt")
ADAPTED_FORMAT = "robustlab-vlm-adapted/1"


@dataclass(frozen=True)
class AdaptMode:
    """Which parameters adapt: ``kind`` full | last | vpt; ``blocks`` (last); ``pad``, ``tokens``,
    ``deep`` (vpt)."""

    kind: str = "full"
    blocks: int = 1
    pad: int = 0
    tokens: int = 0
    deep: bool = False

    def describe(self) -> str:
        if self.kind == "last":
            return f"last:blocks={self.blocks}"
        if self.kind == "vpt":
            return f"vpt:pad={self.pad},tokens={self.tokens},deep={str(self.deep).lower()}"
        return "full"


def parse_mode(spec: str | AdaptMode) -> AdaptMode:
    """``full``, ``last:blocks=2``, ``vpt:pad=4,tokens=8,deep=true`` -> :class:`AdaptMode`."""
    if isinstance(spec, AdaptMode):
        mode = spec
    else:
        kind, params = parse_spec(str(spec), "adaptation mode")
        if kind not in MODES:
            raise RobustlabError(f"adaptation mode {kind!r} is not one of {', '.join(MODES)}")
        allowed = {"full": set(), "last": {"blocks"}, "vpt": {"pad", "tokens", "deep"}}[kind]
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise RobustlabError(f"adaptation mode {kind!r} has no parameter {', '.join(unknown)}; "
                                 f"its parameters: {', '.join(sorted(allowed)) or 'none'}")
        for key in ("blocks", "pad", "tokens"):
            if key in params and (not isinstance(params[key], int) or isinstance(params[key], bool)):
                raise RobustlabError(f"adaptation mode {kind!r}: {key} must be a whole number, got {params[key]!r}")
        if "deep" in params and not isinstance(params["deep"], bool):
            raise RobustlabError(f"adaptation mode 'vpt': deep must be true or false, got {params['deep']!r}")
        defaults = {"vpt": {"pad": 4, "tokens": 0}}.get(kind, {})
        mode = AdaptMode(kind=kind, **{**defaults, **params})
    if mode.kind == "last" and mode.blocks < 1:
        raise RobustlabError(f"adaptation mode 'last': blocks must be >= 1, got {mode.blocks}")
    if mode.kind == "vpt" and (mode.pad < 0 or mode.tokens < 0 or mode.pad + mode.tokens == 0):
        raise RobustlabError("adaptation mode 'vpt' needs a padding prompt (pad=P pixels) or prompt tokens (tokens=T)")
    return mode


class AdaptedVLM(VisionLanguageModel):
    """``base`` with the prompts of ``mode``: a padding prompt between its preprocessing and its image
    tower, prompt tokens hooked into the tower's blocks (:mod:`robustlab.vlm.visual_prompts`). Text,
    temperature and preprocessing are ``base``'s."""

    def __init__(self, base: VisionLanguageModel, mode: AdaptMode, generator: torch.Generator | None = None) -> None:
        super().__init__(base.image_size, base.mean, base.std, channels=base.channels, resize_mode=base.resize_mode,
                         crop=getattr(base, "crop", True))
        self.base = base
        self.mode = mode
        vpt = mode.kind == "vpt"
        self.padding = PaddingPrompt(base.image_size, mode.pad, base.channels) if vpt and mode.pad else None
        self.prompt_tokens = PromptTokens(base.visual, mode.tokens, mode.deep, generator) if vpt and mode.tokens else None

    @property
    def visual(self) -> nn.Module:  # type: ignore[override]
        return self.base.visual

    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        return self.base.preprocess(x01)

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding is not None:
            x = self.padding(x)
        return self.base.encode_preprocessed(x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.base.encode_text(texts)

    @property
    def logit_scale(self) -> float:
        return self.base.logit_scale


#: Names of the modules and parameters that come after the blocks of the image towers we know: open_clip
#: (``ln_post``, ``proj``, ``attn_pool``), Hugging Face (``post_layernorm``, the projection), the tiny CLIP.
HEAD_NAMES = frozenset({"ln_post", "proj", "attn_pool", "post_layernorm", "projection", "visual_projection",
                        "head", "fc_norm"})


def last_blocks_parameters(visual: nn.Module, k: int) -> list[str]:
    """Names (in ``visual``) of the parameters of the last ``k`` blocks and of the head after them
    (final norm, projection: a parameter outside the blocks with a name part in :data:`HEAD_NAMES`)."""
    prefix, blocks = transformer_blocks(visual)
    if k > len(blocks):
        raise RobustlabError(f"mode last:blocks={k}, but the image tower has only {len(blocks)} blocks")
    keep = tuple(f"{prefix}.{i}." for i in range(len(blocks) - k, len(blocks)))
    names = []
    for name, _ in visual.named_parameters():
        if name.startswith(prefix + "."):
            if name.startswith(keep):
                names.append(name)
        elif HEAD_NAMES & set(name.split(".")):
            names.append(name)
    return names


def prepare(vlm: VisionLanguageModel, mode: AdaptMode | str, generator: torch.Generator | None = None) -> AdaptedVLM:
    """Wrap ``vlm`` for adaptation in ``mode``: prompts added where the mode asks, and
    ``requires_grad`` on exactly the parameters that train (everything else frozen, text tower
    included). ``vlm`` itself is changed in place (its flags, and the prompt tokens' hooks for vpt).
    ``generator`` initializes prompt tokens."""
    mode = parse_mode(mode)
    for p in vlm.parameters():
        p.requires_grad_(False)
    adapted = AdaptedVLM(vlm, mode, generator)
    for p in adapted.parameters():
        p.requires_grad_(False)
    if mode.kind == "full":
        for p in vlm.visual.parameters():
            p.requires_grad_(True)
    elif mode.kind == "last":
        wanted = set(last_blocks_parameters(vlm.visual, mode.blocks))
        for name, p in vlm.visual.named_parameters():
            p.requires_grad_(name in wanted)
    else:
        for module in (adapted.padding, adapted.prompt_tokens):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(True)
    return adapted


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that require gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapt(
    vlm: VisionLanguageModel,
    data: Dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    objective: Objective,
    mode: AdaptMode | str,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    *,
    val_data: Dataset | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_epoch: Any = None,
) -> tuple[AdaptedVLM, TrainHistory]:
    """Adapt ``vlm``'s image tower on ``data`` with ``objective`` (``tecoa`` or ``fare``) in ``mode``.

    The loop trains a :class:`ZeroShotClassifier` over ``data``'s classes (``classnames`` x
    ``templates``, embedded once by the frozen text tower); FARE reads no labels (they serve only the
    optional validation) and is given a frozen copy of ``vlm`` as its original encoder. Returns the
    adapted model (eval mode) and the loop's history. ``vlm`` is adapted in place.
    """
    device = torch.device(device)
    vlm.to(device).eval()
    if getattr(objective, "original", "absent") is None:  # fare: the frozen encoder before adaptation
        objective.bind_original(copy.deepcopy(vlm))
    weights = text_classifier(vlm, classnames, templates)
    if weights.shape[0] != data.num_classes:
        raise RobustlabError(f"{len(classnames)} class names for the {data.num_classes} classes of {data.name}")
    adapted = prepare(vlm, mode, torch.Generator().manual_seed(config.seed))
    model = ZeroShotClassifier(adapted, weights).to(device)
    history = train(model, data, config, objective, device=device, progress=progress, on_epoch=on_epoch,
                    val_data=val_data, checkpoint_dir=checkpoint_dir, resume=resume)
    adapted.eval()
    return adapted, history


# ---------------------------------------------------------------------- files


def save_adapted(adapted: AdaptedVLM, path: str | Path, base: str, training: dict[str, Any] | None = None,
                 base_weights: str | None = None) -> Path:
    """Write what adaptation changed to ``X.safetensors`` (the image tower's state dict under
    ``visual.`` for full/last; the prompts alone for vpt) and ``X.json`` (format, the base model's spec ``base`` and its
    ``base_weights`` file if the spec needs one, the mode, how it was trained). Load with :func:`load_adapted` on the same base model."""
    from safetensors.torch import save_file

    from robustlab.models.checkpoint import sha256_file

    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    parts = {"padding": adapted.padding, "prompt_tokens": adapted.prompt_tokens}
    if adapted.mode.kind != "vpt":
        parts["visual"] = adapted.visual
    for prefix, module in parts.items():
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()})
    save_file(tensors, str(weights), metadata={"format": ADAPTED_FORMAT})
    card = {"format": ADAPTED_FORMAT, "base": base, "base_weights": base_weights, "mode": asdict(adapted.mode), "mode_spec": adapted.mode.describe(),
            "training": training or {}, "sha256": sha256_file(weights)}
    weights.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return weights


def read_adapted_card(path: str | Path) -> dict[str, Any]:
    """The card of an adapted model (``X.json`` beside ``X.safetensors``)."""
    p = Path(path)
    card_file = p.with_suffix(".json") if p.suffix in (".safetensors", ".json") else p.with_name(p.name + ".json")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except OSError:
        raise RobustlabError(f"no adapted-model card {card_file}") from None
    except ValueError as err:
        raise RobustlabError(f"adapted-model card {card_file} is not valid JSON: {err}") from None
    if card.get("format") != ADAPTED_FORMAT:
        raise RobustlabError(f"{card_file} is not an adapted-model card (format {card.get('format')!r})")
    return card


def load_adapted(path: str | Path, base: VisionLanguageModel, device: str | torch.device = "cpu") -> AdaptedVLM:
    """Apply a saved adaptation to ``base`` (the model its card names, loaded by the caller): prompts
    added, adapted weights loaded (sha256 checked; every saved tensor must fit). Eval mode."""
    from safetensors.torch import load_file

    from robustlab.models.checkpoint import sha256_file

    card = read_adapted_card(path)
    p = Path(path)
    weights = p.with_suffix(".safetensors") if p.suffix in (".safetensors", ".json") else p.with_name(p.name + ".safetensors")
    if sha256_file(weights) != card["sha256"]:
        raise RobustlabError(f"adapted weights {weights} do not match the sha256 in their card")
    adapted = prepare(base, AdaptMode(**card["mode"]))
    tensors = load_file(str(weights))
    parts = {"padding": adapted.padding, "prompt_tokens": adapted.prompt_tokens, "visual": adapted.visual}
    for prefix, module in parts.items():
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not state:
            continue
        try:
            module.load_state_dict(state, strict=True)
        except (RuntimeError, AttributeError) as err:
            first = str(err).splitlines()[0]
            raise RobustlabError(f"adapted weights {weights} do not fit the base model {card['base']!r} ({first})") from None
    for q in adapted.parameters():
        q.requires_grad_(False)
    return adapted.to(device).eval()


@register_vlm_loader("adapted", "adapted:PATH (an adaptation saved by robustlab adapt, applied to the base model its card names)")
def _load_adapted_spec(path: str, weights: str | None, device: str | torch.device) -> tuple[VisionLanguageModel, dict[str, Any]]:
    from robustlab.vlm.loading import load_vlm

    if weights is not None:
        raise RobustlabError("adapted:PATH names its base model and weights in its card; leave out --weights")
    card = read_adapted_card(path)
    base, info = load_vlm(card["base"], card.get("base_weights"), device)
    return load_adapted(path, base, device), {"source": "robustlab-adapted", "base": info, "weights_sha256": card["sha256"]}
