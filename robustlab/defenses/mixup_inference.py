"""Mixup inference (Pang, Xu & Zhu 2020): the input is mixed with images drawn from a reference set,
``lam * x + (1 - lam) * x_s``, and the prediction is taken over many such mixups. It is meant for a
model trained with mixup (``robustlab train --recipe mixup``), whose outputs are near-linear between
images, so the mixing shrinks an adversarial perturbation by ``lam`` while the clean signal survives.

Reference images are drawn uniformly from the reference set (the paper's MI-PL / MI-OL variants draw
from the predicted class or from the other classes; drawing from all classes is their common form).
Predictions vote over ``draws`` mixups (the paper averages probabilities: the vote is the majority of
the same draws). Mixing is differentiable and randomized: the adaptive attack differentiates it with
EOT over the defense's draws.
"""

from __future__ import annotations

import torch

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


@register_defense
class MixupInference(Defense):
    """Mixup inference: ``reference`` is a data set (``NAME[:SPLIT]``, files from $ROBUSTLAB_DATA, default
    split train) of which the first ``reference_n`` images are mixed in with weight ``1 - lam``."""

    name = "mixup-inference"
    defaults = {"reference": "", "reference_n": 1000, "lam": 0.6, "draws": 30}
    randomized = True

    def validate(self) -> None:
        p = self.params
        if not p["reference"]:
            raise RobustlabError("defense 'mixup-inference' needs its reference set: reference=DATASET[:SPLIT] "
                                 "(images of the training distribution, e.g. reference=mnist:train)")
        if not 0.0 < p["lam"] < 1.0:
            raise RobustlabError(f"defense 'mixup-inference': lam must be in (0, 1), got {p['lam']}")
        if p["reference_n"] < 1 or p["draws"] < 1:
            raise RobustlabError("defense 'mixup-inference': reference_n and draws must be >= 1")
        self._images: torch.Tensor | None = None
        self._load()  # a missing or unreadable reference set fails here, before anything is run

    def _load(self) -> torch.Tensor:
        if self._images is None:
            from robustlab.data import load_dataset

            name, _, split = self.params["reference"].partition(":")
            data = load_dataset(name, split or "train")
            n = min(self.params["reference_n"], len(data))
            self._images = data.batch(range(n))[0]
        return self._images

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        ref = self._load()
        if ref.shape[1:] != x.shape[1:]:
            raise RobustlabError(f"defense 'mixup-inference': reference images are {tuple(ref.shape[1:])}, the inputs "
                                 f"{tuple(x.shape[1:])}; use a reference set of the model's data")
        pick = torch.randint(len(ref), (x.shape[0],), generator=generator, device=generator.device if generator else "cpu")
        lam = self.params["lam"]
        return lam * x + (1 - lam) * ref.to(x.device, x.dtype)[pick.to(x.device)]
