"""Training objectives: standard training and adversarial training recipes, by name.

An objective is built for a threat model with JSON parameters (``create_objective("trades",
ThreatModel("linf", 8/255), beta=6.0)``) and called by the training loop once per batch:

    loss, logs = objective(model, x, y, generator)

``model`` is in train mode; ``loss`` is a scalar tensor to minimize; ``logs`` maps names to detached
scalar tensors averaged over the epoch by the loop (``clean_acc`` and ``adv_acc`` are the accuracies
on the batch's clean and adversarial examples, in train mode, as used by the loss). The inner
maximization runs the model in eval mode (no BatchNorm drift, no dropout), restores the train mode
and differentiates with respect to the input only. ``objective.perturb(model, x, y, generator)``
returns the adversarial batch alone (``None`` for objectives without one).

Before each step the loop calls ``objective.set_progress(epoch, progress)`` (0-based epoch, fraction
of the whole run done in [0, 1)), which drives the optional epsilon warm-up ``eps_warmup`` (the
fraction of the run over which epsilon, and the step size with it, grow linearly to their values).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks import create_attack
from robustlab.errors import RobustlabError
from robustlab.params import Configurable
from robustlab.models.runtime import eval_mode
from robustlab.registry import Registry
from robustlab.threat import ThreatModel
from robustlab.training import inner

Logs = dict[str, torch.Tensor]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == y).float().mean()


def kl_term(logits_adv: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``KL(target || softmax(logits_adv))`` summed over classes and averaged over the batch: the
    TRADES robustness term (target: the clean prediction) and the UAT consistency term (target: the
    clean prediction held fixed). Float32."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), target_probs, reduction="sum") / logits_adv.shape[0]


def load_teacher(recipe: str, teacher: Any) -> tuple[nn.Module, str]:
    """A frozen teacher model (eval mode, no parameter gradients) and its description for the
    recipe's parameters: ``teacher`` is an ``nn.Module`` or a checkpoint path (``X.safetensors``
    with its card)."""
    if isinstance(teacher, nn.Module):
        model, described = teacher, f"<{type(teacher).__name__} given in Python>"
    elif isinstance(teacher, str) and teacher:
        from robustlab.models import load_checkpoint

        model, _ = load_checkpoint(teacher)
        described = teacher
    else:
        raise RobustlabError(f"recipe {recipe!r} needs a teacher: an nn.Module, or teacher=PATH to a checkpoint")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, described


class Objective(Configurable):
    """Base class. Subclasses set ``name``, ``defaults`` (every parameter with its default, JSON
    values only; ``None`` means derived from the threat model) and implement ``loss``.

    Class flags: ``adversarial`` (needs a threat model and has an inner maximization),
    ``single_step`` (a one-step inner maximization, so the loop watches it for catastrophic
    overfitting), ``non_json`` (parameters that may be given as Python objects, e.g. a teacher model),
    ``uses_unlabeled`` (trains on extra unlabeled images: the loop mixes them into every batch with
    the labels :meth:`label_unlabeled` gives them, -1 meaning none), ``needs_dual_bn`` (the model
    must have dual batch norm, ``robustlab.models.dual_bn``).
    """

    component: ClassVar[str] = "recipe"
    adversarial: ClassVar[bool] = True
    single_step: ClassVar[bool] = False
    uses_unlabeled: ClassVar[bool] = False
    needs_dual_bn: ClassVar[bool] = False
    # what the recipe trains: "classifier" (robustlab train) or "vision-language" (robustlab adapt:
    # the zero-shot head or image tower of a CLIP-like model, robustlab.vlm)
    model_kind: ClassVar[str] = "classifier"

    def __init__(self, threat: ThreatModel | None = None, **params: Any) -> None:
        if threat is not None and not isinstance(threat, ThreatModel):
            raise RobustlabError(f"recipe {self.name!r}: threat must be a ThreatModel, got {type(threat).__name__}")
        if self.adversarial and threat is None:
            raise RobustlabError(f"recipe {self.name!r} needs a threat model (norm and epsilon)")
        self.threat = threat
        self.epoch, self.progress = 0, 0.0
        super().__init__(**params)

    # ------------------------------------------------------------------ public

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Logs]:
        return self.loss(model, x, y, generator)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """The adversarial batch the loss trains on (None if the objective has none)."""
        return None

    def label_unlabeled(self, x: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 512) -> torch.Tensor:
        """Labels (int64, on CPU) the loop gives the unlabeled images ``x``, computed once before
        training: -1 (none) here; pseudo-labels in recipes that make them."""
        return torch.full((x.shape[0],), -1, dtype=torch.long)

    def set_progress(self, epoch: int, progress: float) -> None:
        """Called by the loop before each step: 0-based ``epoch`` and the fraction of training done."""
        self.epoch, self.progress = int(epoch), float(progress)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this objective: JSON-serializable."""
        return {**super().config(), "threat": self.threat.to_dict() if self.threat else None}

    def rebuild(self, **params: Any) -> "Objective":
        """This recipe with these parameters (same threat model)."""
        return type(self)(self.threat, **params)

    def validate(self) -> None:
        """Check parameter values; raise RobustlabError with a clear message. Override to add checks."""
        p = self.params
        if "steps" in p and p["steps"] < 1:
            raise RobustlabError(f"recipe {self.name!r}: steps must be >= 1, got {p['steps']}")
        if p.get("alpha") is not None and not (isinstance(p["alpha"], (int, float)) and p["alpha"] > 0):
            raise RobustlabError(f"recipe {self.name!r}: alpha must be > 0, got {p['alpha']}")
        if "eps_warmup" in p and not 0.0 <= p["eps_warmup"] < 1.0:
            raise RobustlabError(f"recipe {self.name!r}: eps_warmup must be a fraction of the run in [0, 1)")
        for key in ("beta", "weight"):
            if key in p and not p[key] >= 0:
                raise RobustlabError(f"recipe {self.name!r}: {key} must be >= 0, got {p[key]}")

    def repr_prefix(self) -> str:
        return f"{self.threat}, "

    # ------------------------------------------------------------------ for subclasses

    def ramp(self) -> float:
        """Epsilon warm-up factor in (0, 1] at the current progress (1 without warm-up)."""
        warm = float(self.params.get("eps_warmup") or 0.0)
        if warm <= 0:
            return 1.0
        return min(1.0, (self.progress + 1e-12) / warm)

    def current_threat(self) -> ThreatModel:
        """The threat model at the current point of the run (epsilon warm-up applied)."""
        assert self.threat is not None
        r = self.ramp()
        return self.threat if r >= 1.0 else self.threat.with_eps(self.threat.eps * r)

    def step_size(self, default_factor: float) -> float:
        """alpha (scaled by the warm-up like epsilon), or ``default_factor * eps`` if alpha is None."""
        alpha = self.params.get("alpha")
        if alpha is None:
            return default_factor * self.current_threat().eps
        return float(alpha) * self.ramp()


OBJECTIVES: Registry[type[Objective]] = Registry("training recipe")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an Objective subclass buildable by its ``name``."""
    return OBJECTIVES.register(cls.name)(cls)


def create_objective(name: str, threat: ThreatModel | None = None, **params: Any) -> Objective:
    """Build the registered recipe ``name`` for ``threat`` with the given parameters."""
    return OBJECTIVES.get(name)(threat, **params)


# ---------------------------------------------------------------------- standard


@register_objective
class Standard(Objective):
    """Empirical risk minimization: cross-entropy on the clean batch. The threat model, if given,
    is only recorded (the loop uses it for robust validation)."""

    name = "standard"
    adversarial = False

    def loss(self, model, x, y, generator):
        logits = model(x)
        return F.cross_entropy(logits, y), {"clean_acc": _accuracy(logits, y)}


@register_objective
class Mixup(Objective):
    """Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018): each batch is mixed
    with a shuffled copy of itself, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``
    per batch, and the loss mixes the two labels' cross-entropies the same way. The model mixup
    inference (defense ``mixup-inference``) expects."""

    name = "mixup"
    adversarial = False
    defaults = {"alpha": 1.0}

    def validate(self) -> None:
        if not self.params["alpha"] > 0:
            raise RobustlabError(f"recipe 'mixup': alpha must be > 0, got {self.params['alpha']}")

    def loss(self, model, x, y, generator):
        lam = _beta_sample(float(self.params["alpha"]), generator)
        perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
        logits = model(lam * x + (1 - lam) * x[perm])
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        return loss, {"clean_acc": _accuracy(logits, y)}


def _beta_sample(alpha: float, generator: torch.Generator | None) -> float:
    """A Beta(alpha, alpha) draw from ``generator``: the ratio of two Gamma draws, each the sum of
    exponentials for an integer shape, else Marsaglia-Tsang's method."""
    def gamma(shape: float) -> float:
        boost = 1.0
        if shape < 1:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
            boost = float(torch.rand((), generator=generator)) ** (1 / shape)
            shape += 1
        d = shape - 1 / 3
        c = 1 / (9 * d) ** 0.5
        while True:
            z = float(torch.randn((), generator=generator))
            v = (1 + c * z) ** 3
            if v <= 0:
                continue
            u = float(torch.rand((), generator=generator))
            if u < 1 - 0.0331 * z**4 or math.log(u) < 0.5 * z * z + d * (1 - v + math.log(v)):
                return d * v * boost

    g1, g2 = gamma(alpha), gamma(alpha)
    return g1 / (g1 + g2)


# ---------------------------------------------------------------------- PGD family


class AdversarialCE(Objective):
    """The recipes that train on cross-entropy at the point ``perturb`` returns (PGD-AT and the
    single-step ones); they differ only in how they find that point."""

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), {"adv_acc": _accuracy(logits, y)}


@register_objective
class PGDAT(AdversarialCE):
    """PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018): cross-entropy on PGD examples.

    The inner maximization runs all ``steps`` steps of size ``alpha`` (default ``2.5 * eps / steps``)
    from a uniform random start in the ball (``random_start``). Published settings: MNIST Linf
    eps 0.3, 40 steps of 0.01; CIFAR-10 Linf eps 8/255, 7-10 steps of 2/255.
    """

    name = "pgd-at"
    defaults = {"steps": 10, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "uniform" if p["random_start"] else "none", generator)


@register_objective
class CurriculumAT(PGDAT):
    """Curriculum adversarial training (Cai, Liu & Song, "Curriculum Adversarial Training", IJCAI
    2018): PGD-AT whose attack strength grows during training. Here the number of PGD steps rises
    linearly with the fraction of the run done, from ``min_steps`` to ``steps`` (step size ``alpha``,
    default ``2.5 * eps / k`` at the current k). The paper raises the strength in stages when
    validation accuracy plateaus; a fixed linear schedule keeps runs reproducible and resumable."""

    name = "curriculum-at"
    defaults = {"steps": 10, "min_steps": 1, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.params["min_steps"] <= self.params["steps"]:
            raise RobustlabError(f"recipe {self.name!r}: min_steps must be in [1, steps]")

    def current_steps(self) -> int:
        lo, hi = self.params["min_steps"], self.params["steps"]
        return min(hi, lo + int(self.progress * (hi - lo + 1)))

    def perturb(self, model, x, y, generator=None):
        k = self.current_steps()
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), k,
                              self.step_size(2.5 / k), "uniform" if self.params["random_start"] else "none", generator)


@register_objective
class TRADES(Objective):
    """TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``, with ``x_adv`` maximizing the KL term
    from ``x + 0.001 * N(0, 1)`` by ``steps`` steps of size ``alpha``.

    Published: beta 6 (1/lambda), 10 steps of 0.007 at Linf eps 0.031 (CIFAR-10); MNIST 40 steps of
    0.01 at eps 0.3. Default alpha here: ``2.5 * eps / steps`` (0.25 eps at 10 steps). The KL is
    summed over classes and averaged over the batch; the clean and adversarial forward passes are
    separate, as in the reference implementation (BatchNorm statistics of each batch apart).
    """

    name = "trades"
    defaults = {"beta": 6.0, "steps": 10, "alpha": None, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        with eval_mode(model), torch.no_grad():
            probs = F.softmax(model(x).float(), dim=1)
        return inner.maximize(model, x, inner.kl_to(probs), self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "normal", generator)

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        logits = model(x)
        logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = kl_term(logits_adv, F.softmax(logits.float(), dim=1))
        logs = {"clean_acc": _accuracy(logits, y), "adv_acc": _accuracy(logits_adv, y), "ce": ce.detach(), "kl": kl.detach()}
        return ce + self.params["beta"] * kl, logs


@register_objective
class MART(Objective):
    """MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples", ICLR 2020): boosted cross-entropy on the adversarial example
    ``CE(f(x'), y) - log(1 - max_{k != y} p_k(x'))`` plus ``beta * KL(p(x) || p(x')) * (1 - p_y(x))``,
    averaged over the batch. ``x'`` maximizes CE from ``x + 0.001 * N(0, 1)`` (as in the reference
    code). Published: beta 6, 10 steps of 0.007 at Linf eps 8/255 (CIFAR-10).
    """

    name = "mart"
    defaults = {"beta": 6.0, "steps": 10, "alpha": None, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "normal", generator)

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        logits = model(x)
        logits_adv = model(x_adv)
        probs = F.softmax(logits.float(), dim=1)
        probs_adv = F.softmax(logits_adv.float(), dim=1)
        # The most likely wrong class on the adversarial example.
        wrong = probs_adv.scatter(1, y[:, None], -1.0).argmax(dim=1)
        boosted = F.cross_entropy(logits_adv.float(), y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong)
        true_prob = probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(probs_adv + 1e-12), probs, reduction="none").sum(dim=1)
        robust = (kl * (1.0000001 - true_prob)).mean()
        logs = {"clean_acc": _accuracy(logits, y), "adv_acc": _accuracy(logits_adv, y),
                "bce": boosted.detach(), "kl": robust.detach()}
        return boosted + self.params["beta"] * robust, logs


@register_objective
class ALP(Objective):
    """Adversarial logit pairing (Kannan, Kurakin & Goodfellow, "Adversarial Logit Pairing", 2018):
    cross-entropy on a minibatch mixing the clean batch and its PGD examples, plus
    ``weight * mean squared difference`` of the paired clean and adversarial logits.

    Published: logit pairing weight 0.5; PGD as in Madry et al. (here ``steps``, ``alpha``). Note
    (Engstrom et al. 2018; Mosbach et al. 2018): logit pairing can mask gradients; evaluate with
    strong attacks.
    """

    name = "alp"
    defaults = {"weight": 0.5, "steps": 10, "alpha": None, "random_start": True, "eps_warmup": 0.0}

    def perturb(self, model, x, y, generator=None):
        p = self.params
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), p["steps"],
                              self.step_size(2.5 / p["steps"]), "uniform" if p["random_start"] else "none", generator)

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        n = x.shape[0]
        logits_all = model(torch.cat([x, x_adv]))  # one mixed minibatch, as in the paper
        logits, logits_adv = logits_all[:n], logits_all[n:]
        ce = F.cross_entropy(logits_all, torch.cat([y, y]))
        pair = F.mse_loss(logits_adv.float(), logits.float())
        logs = {"clean_acc": _accuracy(logits, y), "adv_acc": _accuracy(logits_adv, y), "ce": ce.detach(), "pair": pair.detach()}
        return ce + self.params["weight"] * pair, logs


@register_objective
class CLP(Objective):
    """Clean logit pairing (Kannan et al. 2018): cross-entropy plus ``weight * mean squared
    difference`` of the logits of random pairs of clean examples (the first half of the shuffled
    batch against the second half). No inner maximization; published weight 0.5."""

    name = "clp"
    defaults = {"weight": 0.5}
    adversarial = False

    def loss(self, model, x, y, generator):
        logits = model(x)
        half = x.shape[0] // 2
        ce = F.cross_entropy(logits, y)
        pair = F.mse_loss(logits[:half].float(), logits[half : 2 * half].float()) if half else ce.new_zeros(())
        return ce + self.params["weight"] * pair, {"clean_acc": _accuracy(logits, y), "ce": ce.detach(), "pair": pair.detach()}


# ---------------------------------------------------------------------- single-step recipes


@register_objective
class FGSMAT(AdversarialCE):
    """FGSM adversarial training (Goodfellow et al., "Explaining and Harnessing Adversarial
    Examples", ICLR 2015, without the clean half): cross-entropy on the FGSM example taken from the
    clean point with step eps (robustlab's ``fgsm`` attack). Prone to catastrophic overfitting
    (Wong et al. 2020), which the loop watches for; ``n-fgsm`` is the remedy."""

    name = "fgsm-at"
    defaults = {"eps_warmup": 0.0}
    single_step = True

    def perturb(self, model, x, y, generator=None):
        threat = self.current_threat()
        if getattr(self, "_attack", None) is None or self._attack.threat != threat:
            self._attack = create_attack("fgsm", threat)
        return inner.same_layout(self._attack.run(model, x, y, generator).x_adv, x)


@register_objective
class FastAT(AdversarialCE):
    """"Fast is better than free" (Wong, Rice & Kolter, ICLR 2020): one FGSM step of size ``alpha``
    (default 1.25 eps) from a uniform random start in the ball, projected back; cross-entropy on it.
    Published with a cyclic learning rate (``--schedule cyclic``) and mixed precision; prone to
    catastrophic overfitting at larger eps (the loop watches for it; ``n-fgsm`` is the remedy)."""

    name = "fast-at"
    defaults = {"alpha": None, "eps_warmup": 0.0}
    single_step = True

    def perturb(self, model, x, y, generator=None):
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.current_threat(), 1,
                              self.step_size(1.25), "uniform", generator)


@register_objective
class NFGSM(AdversarialCE):
    """N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial
    Training", NeurIPS 2022): noise drawn uniformly from the ball of radius ``noise * eps`` (default
    2 eps), one step of size ``alpha`` (default eps), and no projection back onto the eps ball (only
    onto the valid box), so training examples lie within ``(noise + 1) * eps`` of the clean image.
    Avoids catastrophic overfitting at the cost of one gradient, like fast AT."""

    name = "n-fgsm"
    defaults = {"noise": 2.0, "alpha": None, "eps_warmup": 0.0}
    single_step = True

    def validate(self) -> None:
        super().validate()
        if not self.params["noise"] >= 0:
            raise RobustlabError(f"recipe {self.name!r}: noise must be >= 0, got {self.params['noise']}")

    def reach(self) -> ThreatModel:
        """The set training examples lie in: the ball of radius (noise * eps + alpha), inside the box."""
        threat = self.current_threat()
        return threat.with_eps(self.params["noise"] * threat.eps + self.step_size(1.0))

    def perturb(self, model, x, y, generator=None):
        threat = self.current_threat()
        noise_ball = threat.with_eps(self.params["noise"] * threat.eps)
        x0 = noise_ball.random_init(x, generator)
        # One unprojected step: projecting onto the reach ball only clips to the valid box.
        return inner.maximize(model, x, inner.cross_entropy_loss(y), self.reach(), 1, self.step_size(1.0), x0)


# ---------------------------------------------------------------------- regularizers


@register_objective
class VAT(Objective):
    """Virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A Regularization
    Method for Supervised and Semi-Supervised Learning", TPAMI 2018): cross-entropy plus
    ``weight * KL(p(x) || p(x + r_vadv))``, with ``r_vadv`` the steepest direction of the KL found by
    ``iterations`` power iterations (finite-difference probes of L2 size ``xi``), scaled to the
    threat model's eps (L2 in the paper; the sign step for Linf) and projected into it. The clean
    prediction is a constant target. Published: xi 1e-6, one power iteration, weight 1; eps is
    data-set specific (e.g. L2 2.0 on MNIST).

    The probes run in float32 even under mixed precision (a 1e-6 probe vanishes in float16). On
    large images a 1e-6 probe spreads to ~1e-8 per pixel, near float32 resolution; a larger xi gives
    the same direction (measured on digits: cosine to the float64 direction 0.77 at xi 1e-6, 0.75 at
    1e-2, 0.71 at 1), so ``xi=1e-2`` is a safe choice there.
    """

    name = "vat"
    defaults = {"weight": 1.0, "xi": 1e-6, "iterations": 1, "eps_warmup": 0.0}

    def validate(self) -> None:
        super().validate()
        if not self.params["xi"] > 0 or self.params["iterations"] < 1:
            raise RobustlabError(f"recipe {self.name!r}: xi must be > 0 and iterations >= 1")

    def perturb(self, model, x, y=None, generator=None):
        with eval_mode(model), torch.no_grad():
            probs = F.softmax(model(x).float(), dim=1)
        return self._perturb(model, x, probs, generator)

    def _perturb(self, model, x, probs, generator):
        threat = self.current_threat()
        d = inner.virtual_adversarial_direction(model, x, probs, self.params["xi"], self.params["iterations"], generator)
        return inner.same_layout(threat.project(x + threat.steepest_step(d, threat.eps, x), x), x).detach()

    def loss(self, model, x, y, generator):
        logits = model(x)
        probs = F.softmax(logits.detach().float(), dim=1)
        x_adv = self._perturb(model, x, probs, generator)
        logits_adv = model(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), probs, reduction="batchmean")
        logs = {"clean_acc": _accuracy(logits, y), "adv_acc": _accuracy(logits_adv, y), "ce": ce.detach(), "kl": kl.detach()}
        return ce + self.params["weight"] * kl, logs


@register_objective
class GradientReg(Objective):
    """Input-gradient regularization by double backpropagation (Drucker & LeCun 1992; Ross &
    Doshi-Velez, "Improving the Adversarial Robustness and Interpretability of Deep Neural Networks by
    Regularizing their Input Gradients", AAAI 2018): ``CE + weight * mean_i ||grad_x CE_i||_2^2``
    (per-sample input gradients). No inner maximization. The papers tune the weight per data set;
    default 1.0."""

    name = "gradient-reg"
    defaults = {"weight": 1.0}
    adversarial = False

    def loss(self, model, x, y, generator):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        (grad,) = torch.autograd.grad(per_sample.sum(), x, create_graph=True)
        penalty = grad.flatten(1).pow(2).sum(dim=1).mean()
        ce = per_sample.mean()
        return ce + self.params["weight"] * penalty, {"clean_acc": _accuracy(logits, y), "ce": ce.detach(),
                                                      "grad_sq": penalty.detach()}


@register_objective
class Distillation(Objective):
    """Defensive distillation (Papernot et al., "Distillation as a Defense to Adversarial
    Perturbations against Deep Neural Networks", IEEE S&P 2016): both networks are trained with the
    softmax at temperature ``temperature`` (published: 100) and deployed at T = 1 (the model's logits
    are used as they are, so its softmax saturates: the logits come out about T times larger).

    Without ``teacher`` this trains the first network: cross-entropy of ``softmax(model(x) / T)``
    with the hard labels. With ``teacher`` (an ``nn.Module`` in Python or a checkpoint path
    ``X.safetensors`` with its card, e.g. the first network) it trains the distilled one: the
    cross-entropy between ``softmax(teacher(x) / T)`` and ``softmax(model(x) / T)``.

    Known to mask gradients rather than add robustness (Carlini & Wagner 2016): the saturated softmax
    at T = 1 makes the cross-entropy's gradient vanish, so a loss on the logits (CW margin, DLR) is
    the honest attack.
    """

    name = "distillation"
    defaults = {"temperature": 100.0, "teacher": ""}
    adversarial = False

    def __init__(self, threat: ThreatModel | None = None, teacher: Any = None, **params: Any) -> None:
        self.teacher, described = (None, "") if teacher is None or teacher == "" else load_teacher(self.name, teacher)
        super().__init__(threat, teacher=described, **params)

    def validate(self) -> None:
        if not self.params["temperature"] > 0:
            raise RobustlabError(f"recipe {self.name!r}: temperature must be > 0")

    def loss(self, model, x, y, generator):
        t = self.params["temperature"]
        logits = model(x)
        log_probs = F.log_softmax(logits.float() / t, dim=1)
        if self.teacher is None:  # the first network: hard labels at temperature T
            loss = F.nll_loss(log_probs, y)
        else:
            self.teacher.to(x.device)
            with torch.no_grad():
                soft = F.softmax(self.teacher(x).float() / t, dim=1)
            loss = -(soft * log_probs).sum(dim=1).mean()
        return loss, {"clean_acc": _accuracy(logits, y)}
