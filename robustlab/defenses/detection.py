"""Adversarial-example detectors and their evaluation, non-adaptive and adaptive.

A detector scores images (higher: more likely adversarial). Its threshold is fixed on clean images
before any attack, at a chosen false-positive rate (5% by default): :func:`threshold_at`. An attacked
point counts as defended when the model still classifies it correctly or the detector flags it.

Detectors (:data:`DETECTORS`, built by name like every component):

- ``squeeze`` (feature squeezing, Xu, Evans & Qi 2018): the largest L1 distance between the model's
  softmax on the input and on its squeezed versions (bit-depth reduction, median smoothing).
- ``mahalanobis`` (Lee et al. 2018): the smallest Mahalanobis distance of the penultimate features
  to a class mean, under one covariance shared by the classes, fitted on clean training images.
- ``magnet`` (Meng & Chen 2017): the reconstruction error of an auto-encoder trained on clean images.
- ``lid`` (Ma et al. 2018): a logistic regression on the local intrinsic dimensionality of every
  layer's output, trained on clean and noisy vs PGD training images.

:func:`evaluate_detection` measures, per attack, the ROC area and the detection rate at the clean
threshold, on the successful adversarial examples. :func:`detector_aware_pgd` is the first, simple
adaptive attack (CE minus a fixed-weight hinge on the score); the strong one, with the CW margin, a
per-sample trade-off search and a selective round, is
:func:`robustlab.attacks.detector_aware.detector_aware_attack`, which takes ``lambda x:
detector.score(model, x)`` (squeezers are differentiated by BPDA with the identity inside ``score``).
The evaluation protocol (store rows, report, leaderboard) is
:mod:`robustlab.eval.protocols.detection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.defenses.bpda import BPDA
from robustlab.defenses.filters import median_filter
from robustlab.errors import RobustlabError
from robustlab.params import Configurable, parse_spec
from robustlab.registry import Registry
from robustlab.threat import ThreatModel


class Detector(Configurable):
    """Base: ``score(model, x)`` (N,) higher is more suspicious; ``fit`` for detectors that learn."""

    component: ClassVar[str] = "detector"
    trained: ClassVar[bool] = False  # fit() must run before score()
    needs_adversarial: ClassVar[bool] = False  # fit() takes adversarial examples of its training images
    compares_views: ClassVar[bool] = False  # score() compares the model's outputs on views(x) with its output on x

    @property
    def fitted(self) -> bool:
        """Whether ``score`` can run (always, for detectors that learn nothing)."""
        return True

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            x_adv: torch.Tensor | None = None) -> "Detector":
        """Fit on clean images ``x`` (labels ``y``) and, for detectors trained to tell them apart,
        adversarial examples ``x_adv`` of the same images (made by the caller's attack)."""
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Differentiable in ``x`` where the detector allows (the adaptive attack uses it)."""
        raise NotImplementedError

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """For detectors that compare the model's outputs on transformed copies of the input
        (``compares_views``): those copies, differentiable (BPDA where the transform is not), so the
        adaptive attack can make the model agree on all of them. Empty for the others."""
        return []

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """What ``fit`` learned, as named contiguous CPU tensors of their own (safetensors writes them;
        empty for detectors that learn nothing), so a fitted detector can be kept and restored
        (``load_fitted_state``) instead of fitted again."""
        return {}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "Detector":
        """Restore what ``fitted_state`` returned (scores then equal those of the detector it came from)."""
        return self


DETECTORS: Registry[type[Detector]] = Registry("detector")


def create_detector(name: str, **params: Any) -> Detector:
    return DETECTORS.get(name)(**params)


def build_detector(spec: str | dict[str, Any]) -> Detector:
    """A detector from a ``NAME[:key=value,...]`` spec or a ``{"name", "params"}`` config (unknown names
    and parameters: one-line errors)."""
    if isinstance(spec, dict):
        if "name" not in spec:
            raise RobustlabError(f"detector entry {spec!r} has no 'name'")
        return create_detector(spec["name"], **dict(spec.get("params") or {}))
    name, params = parse_spec(spec, "detector")
    return create_detector(name, **params)


@DETECTORS.register("squeeze")
class FeatureSqueezing(Detector):
    """Feature squeezing: max over squeezers of ||softmax(f(x)) - softmax(f(squeeze(x)))||_1, with
    bit-depth reduction to ``bits`` bits and median smoothing over ``median`` x ``median`` windows
    (0 leaves a squeezer out). Xu et al. used 1 bit and 2x2 for MNIST, 5 bits and 2x2 for CIFAR-10."""

    name = "squeeze"
    defaults = {"bits": 1, "median": 2}
    compares_views = True

    def validate(self) -> None:
        if not (0 <= self.params["bits"] <= 8 and (self.params["median"] == 0 or 2 <= self.params["median"] <= 5)):
            raise RobustlabError("detector 'squeeze': bits must be in 0..8 and median 0 or in 2..5")
        if not self.params["bits"] and not self.params["median"]:
            raise RobustlabError("detector 'squeeze' needs at least one squeezer (bits or median)")

    def squeezers(self) -> list:
        out = []
        if self.params["bits"]:
            levels = 2 ** self.params["bits"] - 1
            out.append(BPDA(lambda t: torch.round(t * levels) / levels))
        if self.params["median"]:
            out.append(lambda t, k=self.params["median"]: median_filter(t, k))
        return out

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [s(x) for s in self.squeezers()]

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = F.softmax(model(x), dim=1)
        gaps = [(p - F.softmax(model(v), dim=1)).abs().sum(dim=1) for v in self.views(x)]
        return torch.stack(gaps).max(dim=0).values


def penultimate(model: nn.Module) -> nn.Module:
    """The last Linear layer of ``model`` (its input is the penultimate feature vector)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise RobustlabError("detector 'mahalanobis' needs a model whose last layer is nn.Linear")
    return last


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features of ``model`` on ``x`` (the input of its last Linear layer)."""
    got: list[torch.Tensor] = []
    handle = penultimate(model).register_forward_pre_hook(lambda m, args: got.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return got[-1].flatten(1)


@DETECTORS.register("mahalanobis")
class Mahalanobis(Detector):
    """Mahalanobis detector on the penultimate features: class means and one shared covariance fitted
    on clean images (``fit``); the score is the smallest squared Mahalanobis distance to a class mean.
    ``shrinkage``: ridge added to the covariance, relative to its mean eigenvalue. With shrinkage 0 the
    score is -2 x the reference's (Lee et al.'s ``sample_estimator`` / ``get_Mahalanobis_score`` at noise
    magnitude 0, one layer): same class means, same covariance of the class-centred features, inverted
    by the pseudo-inverse as sklearn's EmpiricalCovariance does (tested)."""

    name = "mahalanobis"
    defaults = {"shrinkage": 0.01}
    trained = True

    def validate(self) -> None:
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.means is not None

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None) -> "Mahalanobis":
        with torch.no_grad():
            f = torch.cat([features(model, x[i:i + 256]) for i in range(0, len(x), 256)]).double()
        classes = torch.unique(y)
        means = torch.stack([f[y == c].mean(0) for c in classes])
        centered = f - means[torch.searchsorted(classes, y)]
        cov = centered.T @ centered / len(f)
        cov += self.params["shrinkage"] * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        # the pseudo-inverse, as the reference's sklearn EmpiricalCovariance: dead ReLU units make cov singular
        self.means, self.precision = means.float(), torch.linalg.pinv(cov, hermitian=True).float()
        return self

    def fitted_state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.cpu().clone(), "precision": self.precision.cpu().clone()} if self.fitted else {}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "Mahalanobis":
        self.means, self.precision = state["means"], state["precision"]
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            raise RobustlabError("detector 'mahalanobis' is not fitted: call fit(model, clean images, labels) first")
        d = features(model, x).unsqueeze(1) - self.means.to(x.device).unsqueeze(0)  # N, K, D
        dist = torch.einsum("nkd,de,nke->nk", d, self.precision.to(x.device), d)
        return dist.min(dim=1).values


@DETECTORS.register("magnet")
class MagNet(Detector):
    """Reconstruction-based detection (MagNet's detector, Meng & Chen 2017): a small convolutional
    auto-encoder trained on clean images (``fit``: ``steps`` Adam steps on batches of 128 at ``lr``, L2
    loss with ``noise`` Gaussian noise on the inputs); the score is the mean absolute reconstruction
    error."""

    name = "magnet"
    defaults = {"width": 16, "steps": 2000, "lr": 0.003, "noise": 0.025, "seed": 0}
    trained = True

    def validate(self) -> None:
        self.autoencoder: nn.Module | None = None

    @property
    def fitted(self) -> bool:
        return self.autoencoder is not None

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None) -> "MagNet":
        p = self.params
        g = torch.Generator().manual_seed(p["seed"])
        torch.manual_seed(p["seed"])
        ae = self._autoencoder(x.shape[1])
        opt = torch.optim.Adam(ae.parameters(), lr=p["lr"])
        for _ in range(p["steps"]):
            batch = x[torch.randint(len(x), (min(128, len(x)),), generator=g)]
            noisy = (batch + p["noise"] * torch.randn(batch.shape, generator=g)).clamp(0, 1)
            loss = F.mse_loss(ae(noisy), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self._keep(ae)

    def _autoencoder(self, channels: int) -> nn.Module:
        w = self.params["width"]
        return nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), nn.Sigmoid(), nn.Conv2d(w, w, 3, padding=1),
                             nn.Sigmoid(), nn.Conv2d(w, channels, 3, padding=1), nn.Sigmoid())

    def _keep(self, ae: nn.Module) -> "MagNet":
        self.autoencoder = ae.eval()
        for q in ae.parameters():
            q.requires_grad_(False)
        return self

    def fitted_state(self) -> dict[str, torch.Tensor]:
        if self.autoencoder is None:
            return {}
        return {f"autoencoder.{k}": v.detach().cpu().clone() for k, v in self.autoencoder.state_dict().items()}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "MagNet":
        weights = {k.removeprefix("autoencoder."): v for k, v in state.items()}
        ae = self._autoencoder(weights["0.weight"].shape[1])
        ae.load_state_dict(weights)
        return self._keep(ae)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            raise RobustlabError("detector 'magnet' is not fitted: call fit(model, clean images, labels) first")
        ae = self.autoencoder.to(x.device)
        return (ae(x) - x).abs().flatten(1).mean(dim=1)


def layer_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every ReLU and Linear layer of ``model`` on ``x``, flattened (LID's layers)."""
    got: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: got.append(out.flatten(1)))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.Linear))]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if not got:
        raise RobustlabError("detector 'lid' needs a model with ReLU or Linear layers")
    return got


def distances(f: torch.Tensor, reference: torch.Tensor, reference_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances from each row of ``f`` to each row of ``reference`` (a constant: no gradient
    flows to it), as sqrt(|a|^2 + |b|^2 - 2 a.b): one matrix product forward and one backward.
    ``reference_sq``: the rows' squared norms, if already known. torch.cdist takes the same shortcut
    for large inputs, but also differentiates the reference and rebuilds padded copies of both sides
    on every call (twice the cost inside an attack; benchmarks/detection_lid_cost.py)."""
    ref = reference.detach()
    sq = (ref * ref).sum(dim=1) if reference_sq is None else reference_sq
    d2 = (f * f).sum(dim=1, keepdim=True) + sq - 2 * (f @ ref.T)
    return d2.clamp_min(1e-24).sqrt()


def lid(f: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool = False,
        reference_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The maximum-likelihood estimate of local intrinsic dimensionality of each row of ``f`` among
    its ``k`` nearest rows of ``reference``: -1 / mean_i log(r_i / r_k) (Amsaleg et al. 2015).
    ``exclude_self``: ``f`` is ``reference`` (row i of both the same point), so each row's nearest
    neighbour, itself, is skipped; that is Ma et al.'s ``mle_batch``, which scores a batch against
    itself (tested). The detector scores images against a separate reference set (no skipping)."""
    r = distances(f, reference, reference_sq)
    near = r.topk(k + int(exclude_self), dim=1, largest=False).values[:, int(exclude_self):]
    return -1.0 / torch.log(near / near[:, -1:]).mean(dim=1).clamp_max(-1e-12)


@DETECTORS.register("lid")
class LID(Detector):
    """Local intrinsic dimensionality (Ma et al. 2018): the LID of each ReLU / Linear layer's output
    among ``reference`` clean training images (``k`` neighbours), fed to a logistic regression trained
    (``fit``) to tell clean and noisy images from adversarial examples of the same training images
    (``x_adv``: the caller attacks them, e.g. with PGD). Score: the regression's logit."""

    name = "lid"
    defaults = {"k": 20, "reference": 500, "noise": 0.05, "seed": 0}
    trained = True
    needs_adversarial = True

    def validate(self) -> None:
        self.reference: list[torch.Tensor] | None = None
        self.reference_sq: list[torch.Tensor] | None = None  # their squared norms, computed once
        self.weights: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def _vector(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, layers): the LID of each image's layer outputs among the reference's."""
        feats = layer_features(model, x)
        return torch.stack([lid(f, ref.to(f.device), self.params["k"], reference_sq=sq.to(f.device))
                            for f, ref, sq in zip(feats, self.reference, self.reference_sq)], dim=1)

    def _vectors(self, model: nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
        """``_vector`` without gradients, in batches (all of one layer's outputs for thousands of
        images would take gigabytes)."""
        with torch.no_grad():
            return torch.cat([self._vector(model, x[i:i + batch]) for i in range(0, len(x), batch)])

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None) -> "LID":
        """``x``: clean training images, the first ``reference`` of which (in a random order) become
        the neighbours; the rest, with ``x_adv`` (their adversarial examples, same order as ``x``),
        train the regression."""
        p = self.params
        if x_adv is None or x_adv.shape != x.shape:
            raise RobustlabError("detector 'lid' is trained on adversarial examples of its training images: give "
                                 "x_adv, one per image of x (e.g. PGD examples)")
        if len(x) <= p["reference"]:
            raise RobustlabError(f"detector 'lid' needs more than reference={p['reference']} training images, got {len(x)}")
        g = torch.Generator().manual_seed(p["seed"])
        order = torch.randperm(len(x), generator=g)
        ref_idx, train_idx = order[:p["reference"]], order[p["reference"]:]
        with torch.no_grad():
            self.reference = [f.detach() for f in layer_features(model, x[ref_idx])]
        self.reference_sq = [(f * f).sum(dim=1) for f in self.reference]
        xt, adv = x[train_idx], x_adv[train_idx]
        noisy = (xt + p["noise"] * torch.randn(xt.shape, generator=g)).clamp(0, 1)
        neg = torch.cat([self._vectors(model, xt), self._vectors(model, noisy)])
        pos = self._vectors(model, adv)
        feats = torch.cat([neg, pos])
        self.mean, self.std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        z = torch.cat([(feats - self.mean) / self.std, torch.ones(len(feats), 1)], dim=1)
        target = torch.cat([torch.zeros(len(neg)), torch.ones(len(pos))])
        w = torch.zeros(z.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w, target) + 1e-3 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weights = w.detach()
        return self

    def fitted_state(self) -> dict[str, torch.Tensor]:
        if self.weights is None:
            return {}
        state = {"mean": self.mean, "std": self.std, "weights": self.weights}
        for i, (ref, sq) in enumerate(zip(self.reference, self.reference_sq)):
            state[f"reference.{i}"], state[f"reference_sq.{i}"] = ref, sq
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "LID":
        layers = sum(k.startswith("reference.") for k in state)
        self.reference = [state[f"reference.{i}"] for i in range(layers)]
        self.reference_sq = [state[f"reference_sq.{i}"] for i in range(layers)]
        self.mean, self.std, self.weights = state["mean"], state["std"], state["weights"]
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RobustlabError("detector 'lid' is not fitted: call fit(model, clean training images, labels) first")
        v = (self._vector(model, x) - self.mean.to(x.device)) / self.std.to(x.device)
        return v @ self.weights[:-1].to(x.device) + self.weights[-1].to(x.device)


def scores(detector: Detector, model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([detector.score(model, x[i:i + batch]) for i in range(0, len(x), batch)])


def threshold_at(clean_scores: torch.Tensor, fpr: float = 0.05) -> float:
    """The score above which at most ``fpr`` of the clean images are flagged."""
    if not 0 < fpr < 1:
        raise RobustlabError(f"false-positive rate must be in (0, 1), got {fpr}")
    return float(torch.quantile(clean_scores.double(), 1 - fpr))


def roc_auc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    if len(negative) == 0 or len(positive) == 0:
        return float("nan")
    both = torch.cat([negative, positive]).double()
    ranks = torch.empty_like(both)
    order = both.argsort()
    ranks[order] = torch.arange(1, len(both) + 1, dtype=both.dtype)
    for value in both.unique():  # average ranks over ties
        tied = both == value
        ranks[tied] = ranks[tied].mean()
    n_neg, n_pos = len(negative), len(positive)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_neg * n_pos))


@dataclass
class DetectionResult:
    """One attack against model + detector: ``auc`` (clean vs successful adversarial scores),
    ``detection_rate`` (successful adversarial examples flagged at the clean threshold), ``fooled``
    (attacked points misclassified and not flagged), ``defended_accuracy`` (points correctly classified,
    or misclassified but flagged, over all points)."""

    attack: str
    auc: float
    detection_rate: float
    successful: int
    fooled: int
    defended_accuracy: float


def evaluate_detection(model: nn.Module, detector: Detector, x: torch.Tensor, y: torch.Tensor,
                       x_adv: torch.Tensor, threshold: float, clean_scores: torch.Tensor,
                       attack: str) -> DetectionResult:
    """Score the adversarial examples ``x_adv`` of ``x`` (labels ``y``) against ``threshold`` (fixed on
    clean images); ``clean_scores`` are the detector's scores of clean images (for the ROC)."""
    with torch.no_grad():
        pred = torch.cat([model(x_adv[i:i + 256]).argmax(1) for i in range(0, len(x_adv), 256)])
    adv_scores = scores(detector, model, x_adv)
    success = pred != y
    flagged = adv_scores > threshold
    fooled = int((success & ~flagged).sum())
    n_success = int(success.sum())
    return DetectionResult(
        attack=attack,
        auc=roc_auc(clean_scores, adv_scores[success]),
        detection_rate=float(flagged[success].float().mean()) if n_success else float("nan"),
        successful=n_success, fooled=fooled, defended_accuracy=1 - fooled / len(y),
    )


def detector_aware_pgd(model: nn.Module, detector: Detector, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                       threshold: float, steps: int = 100, weight: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The adaptive attack on classifier and detector together (Carlini & Wagner 2017): PGD on
    ``CE(f(x'), y) - weight * relu(score(x') - 0.9 * threshold) / threshold``: misclassify, and push the
    detector's score under its threshold (with a 10% margin) only where it is above. A point's result
    is the last iterate that is misclassified and under the threshold (else its last iterate)."""
    alpha = 2.5 * threat.eps / steps
    x_cur = threat.random_init(x, generator, radius="uniform")
    best = x_cur.clone()
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    scale = max(threshold, 1e-12)
    for _ in range(steps):
        x_req = x_cur.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_req)
            s = detector.score(model, x_req)
            objective = F.cross_entropy(logits, y, reduction="none") - weight * F.relu(s - 0.9 * threshold) / scale
            (g,) = torch.autograd.grad(objective.sum(), x_req)
        with torch.no_grad():
            ok = (logits.argmax(1) != y) & (s <= threshold)
            best[ok] = x_req.detach()[ok]
            done |= ok
            x_cur = threat.project(x_cur + threat.steepest_step(g, alpha, x_cur), x)
    return torch.where(done.view(-1, *[1] * (x.dim() - 1)), best, x_cur.detach())
