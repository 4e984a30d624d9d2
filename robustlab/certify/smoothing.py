"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): PREDICT and CERTIFY over any base
model, for every noise of :mod:`robustlab.certify.noise`.

The smoothed classifier ``g(x) = argmax_c P(f(x + noise) = c)``. Its two Monte Carlo procedures,
as published (Algorithm "PREDICT" and "CERTIFY" of the paper; the reference is locuslab/smoothing's
``core.py``):

- PREDICT(x, n, alpha): n draws, counts of the two top classes nA, nB; abstain unless the two-sided
  binomial test of nA out of nA + nB at p = 1/2 rejects at level alpha (p-value <= alpha).
- CERTIFY(x, n0, n, alpha): n0 draws select the top class cA; n more draws count nA; the one-sided
  (1 - alpha) Clopper-Pearson lower bound pA_lower of nA / n; abstain when pA_lower < 1/2, else
  return cA with the radius the noise gives for pA_lower (sigma * Phi^-1(pA_lower) for Gaussian).

Draws are batched: each image's draws are made in chunks of at most ``batch_size`` noisy images
(the reference's chunks), written in place into one preallocated batch by the noise (no Python
work per draw), and chunks of several images share a forward pass when they fit. Each image draws
from its own generator, so its counts depend only on (its generator, n0, n, batch size), not on
which other images are certified with it.

Units: noise scales are in [0, 1] image units (the model normalizes inside). Radii are in the
noise's norm (L2, L1, or pixels for ablation), in the same units.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest
from torch import nn

from robustlab.certify.noise import Noise
from robustlab.errors import RobustlabError
from robustlab.predictor import ABSTAIN, Predictor


class SmoothingWarning(UserWarning):
    """A configuration that cannot certify (or predict) anything."""


def clopper_pearson_lower(successes: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower confidence bound of a binomial proportion
    ``successes / n``: the alpha quantile of Beta(successes, n - successes + 1); 0 with no successes."""
    if successes <= 0:
        return 0.0
    return float(beta_dist.ppf(alpha, successes, n - successes + 1))


def smallest_certifying_n(alpha: float) -> int:
    """The smallest n for which n unanimous votes pass CERTIFY's bound at ``alpha`` (pA_lower =
    alpha^(1/n) >= 1/2, i.e. n >= log2(1 / alpha))."""
    n = max(1, math.floor(math.log(alpha) / math.log(0.5)))
    while clopper_pearson_lower(n, n, alpha) < 0.5:
        n += 1
    return n


def smallest_predicting_n(alpha: float) -> int:
    """The smallest n for which n unanimous votes pass PREDICT's two-sided binomial test at
    ``alpha`` (2 * 2^-n <= alpha)."""
    n = 1
    while binomtest(n, n, 0.5).pvalue > alpha:
        n += 1
    return n


def check_settings(n0: int, n: int, alpha: float, batch_size: int = 1) -> None:
    """Refuse impossible settings with one clear line each."""
    if not 0.0 < alpha < 1.0:
        raise RobustlabError(f"alpha must be in (0, 1) (the failure probability), got {alpha:g}")
    if n < 1 or n0 < 1:
        raise RobustlabError(f"n and n0 must be >= 1, got n={n}, n0={n0}")
    if n0 > n:
        raise RobustlabError(f"n0 ({n0}, draws to select the class) must not exceed n ({n}, draws to estimate it)")
    if batch_size < 1:
        raise RobustlabError(f"the noise batch size must be >= 1, got {batch_size}")


def too_few_draws(n: int, alpha: float) -> str | None:
    """A warning line when even n unanimous votes cannot pass the bound at ``alpha``, else None."""
    if clopper_pearson_lower(n, n, alpha) >= 0.5:
        return None
    return (f"n={n} draws cannot certify anything at alpha={alpha:g}: even {n} unanimous votes give a lower bound "
            f"{alpha ** (1 / n):.3f} < 0.5, so every point abstains; use n >= {smallest_certifying_n(alpha)}")


def max_radius(noise: Noise, n: int, alpha: float, image_shape: Sequence[int]) -> float:
    """The largest radius CERTIFY can return with n draws (n unanimous votes)."""
    p = clopper_pearson_lower(n, n, alpha)
    return noise.radius(p, tuple(image_shape)) if p >= 0.5 else 0.0


def check_base_model(model: nn.Module) -> None:
    """A base model with BatchNorm in training mode would use each noisy batch's statistics (and
    change its running averages): refused, naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise RobustlabError(f"the base model has BatchNorm in training mode ({name or type(m).__name__}): "
                                 "call model.eval() before smoothing it")


@dataclass
class Certificate:
    """CERTIFY's answer per image: prediction (or ABSTAIN), radius (0 when abstaining), the selection
    and estimation counts of the predicted class (cA), and the lower bound pA_lower."""

    prediction: torch.Tensor  # (N,) int64
    radius: torch.Tensor  # (N,) float64
    count_selection: torch.Tensor  # (N,) votes for cA among the n0 selection draws
    count_estimation: torch.Tensor  # (N,) votes for cA among the n estimation draws (nA)
    p_lower: torch.Tensor  # (N,) float64


class SmoothedClassifier(Predictor):
    """g = smoothing of ``base`` by ``noise``.

    ``forward(x)``: the soft smoothed classifier's log-probabilities, log of the mean softmax over
    ``attack_draws`` noisy copies (the differentiable surrogate SmoothAdv attacks), drawing from the
    generator of :meth:`set_generator`. ``predict(x, generator)``: PREDICT with ``n`` draws.
    ``certify(x, generators)``: CERTIFY.
    """

    randomized = True

    def __init__(self, base: nn.Module, noise: Noise, num_classes: int, *, n0: int = 100, n: int = 1000,
                 alpha: float = 0.001, batch_size: int = 400, attack_draws: int = 8) -> None:
        super().__init__()
        check_base_model(base)
        check_settings(n0, n, alpha, batch_size)
        message = too_few_draws(n, alpha)
        if message:
            warnings.warn(message, SmoothingWarning, stacklevel=2)
        self.base, self.noise, self.num_classes = base, noise, int(num_classes)
        self.n0, self.n, self.alpha, self.batch_size = int(n0), int(n), float(alpha), int(batch_size)
        self.attack_draws = int(attack_draws)
        self.draws = self.n
        self._generator: torch.Generator | None = None

    def set_generator(self, generator: torch.Generator | None) -> None:
        self._generator = generator

    # ------------------------------------------------------------------ the soft classifier (attacks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.attack_draws
        noisy = self.noise.perturb(x.repeat_interleave(m, dim=0), self._generator)
        probs = F.softmax(self.base(noisy).float(), dim=1).view(x.shape[0], m, -1).mean(dim=1)
        return probs.clamp_min(1e-12).log()

    # ------------------------------------------------------------------ Monte Carlo procedures

    def counts(self, x: torch.Tensor, num: int, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Votes (N, classes) of the base model over ``num`` noisy copies of each image of ``x``."""
        return vote_counts(self.base, x, num, self.noise, self.batch_size, generators, self.num_classes)

    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """PREDICT: the top class when the binomial test of its votes against the runner-up's rejects
        at alpha, else ABSTAIN. ``generator``: one for the batch, or a list of one per image."""
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * x.shape[0]
        counts = self.counts(x, self.n, gens)
        return predict_from_counts(counts, self.alpha)

    def certify(self, x: torch.Tensor, generators: Sequence[torch.Generator | None],
                selection_generators: Sequence[torch.Generator | None] | None = None) -> Certificate:
        """CERTIFY each image of ``x``: n0 draws (from ``selection_generators``, default the same
        generators) select cA, n draws estimate pA."""
        selection = self.counts(x, self.n0, selection_generators or generators)
        estimation = self.counts(x, self.n, generators)
        return certificate_from_counts(selection, estimation, self.n, self.alpha, self.noise, tuple(x.shape[1:]))


def vote_counts(base: nn.Module, x: torch.Tensor, num: int, noise: Noise, batch_size: int,
                generators: Sequence[torch.Generator | None], num_classes: int) -> torch.Tensor:
    """Votes (N, classes), int64 on CPU, of ``base`` over ``num`` noisy copies of each image.

    Image i's copies are drawn in chunks of at most ``batch_size`` from ``generators[i]`` (the
    reference's chunking); chunks of consecutive images are packed into one forward batch of at most
    ``batch_size`` images as long as they fit."""
    n_img = x.shape[0]
    if len(generators) != n_img:
        raise ValueError(f"{len(generators)} generators for {n_img} images")
    counts = torch.zeros((n_img, num_classes), dtype=torch.long, device=x.device)
    buf = torch.empty((min(batch_size, n_img * num), *x.shape[1:]), dtype=x.dtype, device=x.device)
    owner = torch.empty(buf.shape[0], dtype=torch.long, device=x.device)
    fill = 0

    def flush(k: int) -> None:
        if k == 0:
            return
        pred = base(buf[:k]).argmax(dim=1)
        counts.view(-1).index_add_(0, owner[:k] * num_classes + pred, torch.ones_like(pred))

    with torch.inference_mode():
        for i in range(n_img):
            left = num
            while left:
                k = min(left, batch_size)
                if fill + k > buf.shape[0]:
                    flush(fill)
                    fill = 0
                noise.sample_(buf[fill:fill + k], x[i], generators[i])
                owner[fill:fill + k] = i
                fill += k
                left -= k
        flush(fill)
    return counts.cpu()


def predict_from_counts(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """PREDICT's decision per row of vote counts: the top class, or ABSTAIN when the two-sided
    binomial test of the top count against the runner-up's does not reject at ``alpha``."""
    out = []
    for row in counts.tolist():
        order = np.argsort(row, kind="stable")[::-1]
        c1, c2 = row[order[0]], row[order[1]] if len(row) > 1 else 0
        out.append(ABSTAIN if binomtest(c1, c1 + c2, 0.5).pvalue > alpha else int(order[0]))
    return torch.tensor(out, dtype=torch.long)


def certificate_from_counts(selection: torch.Tensor, estimation: torch.Tensor, n: int, alpha: float,
                            noise: Noise, image_shape: tuple[int, ...]) -> Certificate:
    """CERTIFY's decision from the selection and estimation votes (rows per image)."""
    top = selection.argmax(dim=1)  # ties: the smaller class index, as numpy's argmax in the reference
    n_sel = selection.gather(1, top[:, None])[:, 0]
    n_a = estimation.gather(1, top[:, None])[:, 0]
    preds, radii, bounds = [], [], []
    for c, k in zip(top.tolist(), n_a.tolist()):
        p = clopper_pearson_lower(k, n, alpha)
        bounds.append(p)
        if p < 0.5:
            preds.append(ABSTAIN)
            radii.append(0.0)
        else:
            preds.append(c)
            radii.append(noise.radius(p, image_shape))
    return Certificate(torch.tensor(preds, dtype=torch.long), torch.tensor(radii, dtype=torch.float64),
                       n_sel, n_a, torch.tensor(bounds, dtype=torch.float64))
