"""A small CLIP-like model that trains on a CPU in minutes: a small ViT image tower and a small text
transformer over a word tokenizer whose vocabulary comes from the captions it was pretrained on.

It exists so the whole zero-shot pipeline (pretraining, zero-shot evaluation, TeCoA / prompt tuning /
FARE adaptation) can be run end to end without downloaded weights. Pretraining
(:mod:`robustlab.vlm.pretrain`) uses captions made of class names x prompt templates.

On disk: ``X.safetensors`` (the state dict) and ``X.json`` (format, config, vocabulary, how it was
trained, sha256 of the weights). :func:`load_tiny_clip` rebuilds it; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.vlm.base import VisionLanguageModel
from robustlab.vlm.loading import register_vlm_loader

FORMAT = "robustlab-tiny-clip/1"
PAD, UNK = "<pad>", "<unk>"
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at 100
WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The tokens of ``text``: lower-case runs of letters and digits ("T-shirt/top" -> t, shirt, top)."""
    return WORD.findall(text.lower())


def build_vocab(texts: Sequence[str]) -> list[str]:
    """The vocabulary of ``texts``: ``<pad>``, ``<unk>``, then every word in order of first use."""
    vocab = [PAD, UNK]
    seen = set(vocab)
    for text in texts:
        for w in words(text):
            if w not in seen:
                seen.add(w)
                vocab.append(w)
    return vocab


class WordTokenizer:
    """Words -> ids (unknown words -> ``<unk>``), padded or cut to ``context_length``."""

    def __init__(self, vocab: Sequence[str], context_length: int) -> None:
        if list(vocab[:2]) != [PAD, UNK]:
            raise RobustlabError("a tiny-clip vocabulary starts with <pad> and <unk>")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """int64 ids (T, context_length); 0 is padding. Every text keeps at least one token."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, 1) for w in words(text)][: self.context_length] or [1]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@dataclass
class TinyCLIPConfig:
    """Sizes of the two towers. ``embed_dim`` is the shared embedding space."""

    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 16
    embed_dim: int = 64
    mlp_ratio: float = 2.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyCLIPConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RobustlabError(f"tiny-clip config has unknown fields: {', '.join(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each residual. Optional key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % heads:
            raise RobustlabError(f"width {width} is not a multiple of the {heads} heads")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # True: attend
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out(a.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """Patch embedding, a class token, ``layers`` transformer blocks, the class token's features
    projected to ``embed_dim``. Prompt tokens hook into ``blocks`` (:mod:`robustlab.vlm.visual_prompts`)."""

    def __init__(self, cfg: TinyCLIPConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise RobustlabError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        w = cfg.vision_width
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        grid = cfg.image_size // cfg.patch_size
        self.class_token = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, w) * 0.02)
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, cfg.vision_heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, cfg.embed_dim) * w**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, W)
        cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)


class TextTower(nn.Module):
    """Token + position embeddings, ``layers`` blocks over the non-padding tokens, their mean,
    projected to ``embed_dim``."""

    def __init__(self, cfg: TinyCLIPConfig, vocab_size: int) -> None:
        super().__init__()
        w = cfg.text_width
        self.token_embed = nn.Embedding(vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, cfg.embed_dim) * w**-0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return ((x * m).sum(1) / m.sum(1).clamp_min(1)) @ self.proj.to(x.dtype)


class TinyCLIP(VisionLanguageModel):
    """The small CLIP: ``visual`` (:class:`TinyViT`), ``text`` (:class:`TextTower`) over a
    :class:`WordTokenizer`, and a learned temperature ``log_scale`` (``logit_scale = exp(log_scale)``,
    at most 100). Images: grey is repeated to 3 channels and everything is resized to ``image_size``
    (bilinear) by :meth:`preprocess`."""

    def __init__(self, cfg: TinyCLIPConfig, vocab: Sequence[str]) -> None:
        super().__init__(cfg.image_size, cfg.mean, cfg.std, channels=3, resize_mode="bilinear")
        self.config = cfg
        self.tokenizer = WordTokenizer(vocab, cfg.context_length)
        self.visual = TinyViT(cfg)
        self.text = TextTower(cfg, len(self.tokenizer.vocab))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.text(self.tokenizer(texts).to(self.log_scale.device))

    def scale_tensor(self) -> torch.Tensor:
        """The temperature as a tensor (differentiable: pretraining learns it)."""
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    @property
    def logit_scale(self) -> float:
        return float(self.scale_tensor().detach())


# ---------------------------------------------------------------------- files


@dataclass
class TinyCLIPCard:
    """What goes beside the weights: the config, the vocabulary and how the model was trained."""

    config: dict[str, Any]
    vocab: list[str]
    training: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    sha256: str = ""
    format: str = FORMAT


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_tiny_clip(model: TinyCLIP, path: str | Path, training: dict[str, Any] | None = None, notes: str = "") -> Path:
    """Write ``X.safetensors`` (weights, without prompt tokens' absence mattering: prompt tuning
    saves its own file) and the card ``X.json``; returns the weights path."""
    from safetensors.torch import save_file

    from robustlab.models.checkpoint import sha256_file

    weights, card_file = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT})
    cfg = asdict(model.config)
    card = TinyCLIPCard(config=cfg, vocab=model.tokenizer.vocab, training=training or {}, notes=notes,
                        sha256=sha256_file(weights))
    card_file.write_text(json.dumps(asdict(card), indent=1) + "\n", encoding="utf-8")
    return weights


def read_tiny_clip_card(path: str | Path) -> TinyCLIPCard:
    """The card of a saved tiny CLIP (``X.json`` beside ``X.safetensors``); one clear error if absent."""
    weights, card_file = _paths(path)
    if not card_file.is_file():
        raise RobustlabError(f"no tiny-clip card {card_file} beside the weights {weights}")
    try:
        raw = json.loads(card_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RobustlabError(f"tiny-clip card {card_file} is not valid JSON: {err}") from None
    if raw.get("format") != FORMAT:
        raise RobustlabError(f"{card_file} is not a tiny-clip card (format {raw.get('format')!r}, expected {FORMAT!r})")
    return TinyCLIPCard(**{k: raw[k] for k in TinyCLIPCard.__dataclass_fields__ if k in raw})


def load_tiny_clip(path: str | Path, device: str | torch.device = "cpu") -> TinyCLIP:
    """Rebuild a saved tiny CLIP from its card and weights (sha256 checked); eval mode."""
    from safetensors.torch import load_file

    from robustlab.models.checkpoint import sha256_file

    weights, _ = _paths(path)
    card = read_tiny_clip_card(weights)
    if not weights.is_file():
        raise RobustlabError(f"tiny-clip weights {weights} not found")
    if card.sha256 and sha256_file(weights) != card.sha256:
        raise RobustlabError(f"tiny-clip weights {weights} do not match the sha256 in their card")
    model = TinyCLIP(TinyCLIPConfig.from_dict(card.config), card.vocab)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise RobustlabError(f"tiny-clip weights {weights} do not fit the config in their card: {first}") from None
    return model.to(device).eval()


@register_vlm_loader("tiny", "tiny:PATH (robustlab's small CLIP, a .safetensors with its card)")
def _load_tiny(path: str, weights: str | None, device: str | torch.device) -> tuple[VisionLanguageModel, dict[str, Any]]:
    if weights is not None:
        raise RobustlabError("tiny:PATH takes its weights from PATH; leave out --weights")
    model = load_tiny_clip(path, device)
    return model, {"source": "robustlab-tiny-clip", "weights": str(_paths(path)[0]),
                   "weights_sha256": read_tiny_clip_card(path).sha256}
