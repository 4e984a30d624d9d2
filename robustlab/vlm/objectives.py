"""Training recipes for adapting a vision-language model's image tower: TeCoA and FARE.

Both plug into robustlab's one training loop (:func:`robustlab.training.train`) like any other
recipe; :func:`robustlab.vlm.adapt.adapt` sets them up (which parameters train, the frozen text
embeddings, the frozen original encoder).

- ``tecoa`` (Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models",
  ICLR 2023): the model is a :class:`~robustlab.vlm.zeroshot.ZeroShotClassifier` over the training
  classes (text embeddings computed once, text tower frozen); adversarial images by PGD on the
  cross-entropy of its zero-shot logits, then cross-entropy of those logits at the adversarial images.
  Defaults follow the paper: 2 steps of size eps (they train at Linf 1/255).
- ``fare`` (Schlarmann et al., "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings
  for Robust Large Vision-Language Models", ICML 2024): no labels;
  ``loss = ||phi(x_adv) - phi_orig(x)||_2^2`` (squared L2 of the unnormalized embeddings, batch mean)
  with ``x_adv`` maximizing that same loss (PGD, ``steps`` steps of ``alpha``, default 2.5 eps /
  steps: the paper's 10 steps of 1/255 at 4/255) and ``phi_orig`` the frozen encoder before adaptation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training import inner
from robustlab.training.objectives import PGDAT, Objective, register_objective


def image_embeddings(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image embeddings (N, D) from a zero-shot classifier (its ``vlm``), a vision-language model
    (``encode_image``) or a plain embedding network (``model(x)``)."""
    if hasattr(model, "vlm"):
        return model.vlm.encode_image(x)
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    return model(x)


class _Embedder(nn.Module):
    """``model`` as an nn.Module that returns image embeddings (for the inner maximization)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return image_embeddings(self.model, x)


@register_objective
class TeCoA(PGDAT):
    """Text-guided contrastive adversarial training: PGD-AT on the zero-shot logits of the training
    classes (``model`` is a :class:`~robustlab.vlm.zeroshot.ZeroShotClassifier`). ``steps`` PGD steps
    of ``alpha`` (default: eps, the paper's 2 steps of 1/255 at 1/255) from a uniform random start."""

    name = "tecoa"
    model_kind = "vision-language"
    defaults: ClassVar[dict[str, Any]] = {"steps": 2, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), p["steps"],
                              self.step_size(1.0), "uniform" if p["random_start"] else "none", generator)


@register_objective
class FARE(Objective):
    """Unsupervised adversarial fine-tuning of the image embedding (labels are never read).

    ``original``: the frozen encoder before adaptation (an nn.Module mapping images in [0, 1] to
    embeddings, e.g. a frozen copy of the vision-language model); :func:`robustlab.vlm.adapt.adapt`
    gives it. Logs ``embedding_l2``: the mean L2 distance between ``phi(x_adv)`` and ``phi_orig(x)``."""

    name = "fare"
    model_kind = "vision-language"
    defaults: ClassVar[dict[str, Any]] = {"steps": 10, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def __init__(self, threat: ThreatModel | None = None, original: nn.Module | None = None, **params: Any) -> None:
        self.original: nn.Module | None = None
        if original is not None:
            self.bind_original(original)
        super().__init__(threat, **params)

    def bind_original(self, original: nn.Module) -> None:
        """Set the frozen reference encoder (eval mode, no parameter gradients)."""
        if not isinstance(original, nn.Module):
            raise RobustlabError(f"recipe 'fare': original must be an nn.Module, got {type(original).__name__}")
        original.eval()
        for p in original.parameters():
            p.requires_grad_(False)
        self.original = original

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen original's embeddings of the clean images (float32, no gradient)."""
        if self.original is None:
            raise RobustlabError("recipe 'fare' needs the frozen original encoder (robustlab.vlm.adapt gives it)")
        with torch.no_grad(), eval_mode(self.original):
            return image_embeddings(self.original, x).float()

    def perturb(self, model, x, y=None, generator=None):
        return self._attack(model, x, self.target(x), generator)

    def _attack(self, model, x, target, generator):
        p = self.params

        def distance(emb: torch.Tensor) -> torch.Tensor:
            return (emb.float() - target).pow(2).sum(dim=1)

        return inner.maximize(_Embedder(model), x, distance, self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "uniform" if p["random_start"] else "none", generator)

    def loss(self, model, x, y, generator):
        target = self.target(x)
        x_adv = self._attack(model, x, target, generator)
        sq = (image_embeddings(model, x_adv).float() - target).pow(2).sum(dim=1)
        return sq.mean(), {"embedding_l2": sq.detach().sqrt().mean()}
