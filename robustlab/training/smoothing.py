"""Training base models for randomized smoothing (``robustlab.certify``).

- ``noise`` (Cohen, Rosenfeld & Kolter 2019): cross-entropy on the batch under the smoothing noise
  it will be certified with (``noise=gaussian``, ``sigma``; any noise of
  :data:`robustlab.certify.noise.NOISES`, ablation with ``keep``). No threat model.
- ``smoothadv`` (Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
  Classifiers", NeurIPS 2019; SmoothAdv-PGD): ``m`` noise draws per image, held fixed for the step;
  ``steps`` steps of L2 PGD on the soft smoothed classifier's loss
  ``-log(mean_j softmax(f(x' + d_j))_y)`` inside the threat model's ball; then the mean
  cross-entropy of f at ``x' + d_j`` over the draws. Published CIFAR-10 settings: sigma 0.25-1.0,
  eps 0.25-2.0 (L2), m 1-8, steps 1-10, eps warm-up over the first 10 epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.certify.noise import NOISES, create_noise
from robustlab.errors import RobustlabError
from robustlab.training import inner
from robustlab.training.objectives import Objective, _accuracy, register_objective


def _noise(recipe: str, params: dict) -> object:
    name = params["noise"]
    if name not in NOISES:
        raise RobustlabError(f"recipe {recipe!r}: unknown noise {name!r}; known: {', '.join(NOISES.names())}")
    if name == "ablation":
        return create_noise(name, keep=params["keep"])
    return create_noise(name, sigma=params["sigma"])


@register_objective
class NoiseAugmentation(Objective):
    """Cross-entropy under the smoothing noise (Gaussian data augmentation for Gaussian smoothing)."""

    name = "noise"
    adversarial = False
    defaults = {"noise": "gaussian", "sigma": 0.25, "keep": 45}

    def validate(self) -> None:
        self.noise = _noise(self.name, self.params)

    def loss(self, model, x, y, generator):
        logits = model(self.noise.perturb(x, generator))
        return F.cross_entropy(logits, y), {"noisy_acc": _accuracy(logits, y)}


class _FixedDrawsSoftClassifier(nn.Module):
    """log of the mean softmax of ``base`` over fixed noise draws (m per image): what SmoothAdv's
    inner maximization ascends (the noise is held fixed during the attack)."""

    def __init__(self, base: nn.Module, draws: torch.Tensor, m: int) -> None:
        super().__init__()
        self.base, self.draws, self.m = base, draws, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x.repeat_interleave(self.m, dim=0) + self.draws)
        probs = F.softmax(logits.float(), dim=1).view(x.shape[0], self.m, -1).mean(dim=1)
        return probs.clamp_min(1e-12).log()


@register_objective
class SmoothAdv(Objective):
    """SmoothAdv-PGD (L2 threat model; additive noises)."""

    name = "smoothadv"
    defaults = {"noise": "gaussian", "sigma": 0.25, "m": 2, "steps": 2, "alpha": None, "eps_warmup": 0.0}

    def validate(self) -> None:
        super().validate()
        if self.params["noise"] == "ablation":
            raise RobustlabError("recipe 'smoothadv' needs an additive noise (gaussian, laplace, uniform)")
        if self.params["m"] < 1:
            raise RobustlabError(f"recipe 'smoothadv': m (noise draws per image) must be >= 1, got {self.params['m']}")
        if self.threat is not None and self.threat.norm != "l2":
            raise RobustlabError(f"recipe 'smoothadv' attacks in L2 (Gaussian certificates); got --norm {self.threat.norm}")
        self.noise = _noise(self.name, {**self.params, "keep": 1})

    def perturb(self, model, x, y, generator=None):
        return self._attack(model, x, y, self._draws(x, generator), generator)

    def _draws(self, x: torch.Tensor, generator) -> torch.Tensor:
        m = self.params["m"]
        with torch.no_grad():
            zeros = torch.zeros((x.shape[0] * m, *x.shape[1:]), dtype=x.dtype, device=x.device)
            return self.noise.perturb(zeros, generator)

    def _attack(self, model, x, y, draws, generator):
        p = self.params
        soft = _FixedDrawsSoftClassifier(model, draws, p["m"])
        threat = self.current_threat()
        if threat.eps <= 0:
            return x.detach()
        alpha = self.step_size(2.0 / p["steps"])  # SmoothAdv's default step: 2 eps / steps
        return inner.maximize(soft, x, lambda logp: F.nll_loss(logp, y, reduction="none"), threat, p["steps"],
                              alpha, "none", generator)

    def loss(self, model, x, y, generator):
        m = self.params["m"]
        draws = self._draws(x, generator)
        x_adv = self._attack(model, x, y, draws, generator)
        logits = model(x_adv.repeat_interleave(m, dim=0) + draws)
        loss = F.cross_entropy(logits, y.repeat_interleave(m))
        return loss, {"adv_noisy_acc": _accuracy(logits, y.repeat_interleave(m))}

