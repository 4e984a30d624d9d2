"""Label-free training of a purifier (NRP, Naseer et al. 2020) with the one training loop.

Each batch: perturb the clean images ``x`` with SSP (:class:`robustlab.attacks.ssp.SSP`) against a
frozen feature network (a layer of any model: a zoo or checkpoint classifier, or a randomly
initialised architecture), then train the purifier ``P`` so that the features of ``P(x_adv)`` match
those of ``x``. The loss (:class:`NRPObjective`) is

    feature_weight * ||F(P(x_adv)) - F(x)||^2 / ||F(x)||^2        (feature loss, relative)
  + pixel_weight   * mean((P(x_adv) - x)^2)                        (pixel loss, optional)
  + adv_weight     * relativistic-average GAN loss of P(x_adv)     (adversarial loss, optional)

with squared norms averaged over the batch. The adversarial loss uses a small patch discriminator
trained beside the purifier (its loss is added to the same scalar: the discriminator's term sees
the purified images detached and the purifier's term sees the discriminator's weights detached, so
one optimizer step updates each network only by its own loss).

Labels are never used (a folder of images gets label 0 everywhere). The loop
(:func:`robustlab.training.loop.train`) brings progress, a checkpoint after every epoch and every
``save_every`` seconds inside one, and ``resume`` to the weights an uninterrupted run reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.ssp import SSP, FeatureExtractor
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.models.purifier import build_purifier
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.training.loop import TrainConfig, TrainHistory, train
from robustlab.training.objectives import Logs, Objective


def default_layer(network: nn.Module, image_shape: tuple[int, int, int]) -> str:
    """The feature layer used when none is named: the last module (in execution order) whose output is
    a spatial feature map (N, C, H, W) with H, W > 1 -- the deepest convolutional features, the
    counterpart of the paper's mid-level VGG layer in the small networks here."""
    order: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in network.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: order.append((name, tuple(out.shape))) if torch.is_tensor(out) else None))
    try:
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        with eval_mode(network), torch.no_grad():
            network(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    maps = [name for name, shape in order if len(shape) == 4 and shape[2] > 1 and shape[3] > 1]
    if not maps:
        raise RobustlabError("the feature network has no layer with a spatial feature map (N, C, H, W); name one "
                             "with --layer")
    return maps[-1]


class PurifierTrainee(nn.Module):
    """What the loop trains: the purifier, and the discriminator of the adversarial loss when it is on."""

    def __init__(self, purifier: nn.Module, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.purifier = purifier
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purifier(x)


def make_discriminator(channels: int, width: int = 32) -> nn.Module:
    """A small patch discriminator: two stride-2 convs and a 3x3 conv to one logit per patch."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 1, 3, padding=1),
    )


def _frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters detached (gradients reach ``x`` only)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def _ragan(real: torch.Tensor, fake: torch.Tensor, fake_is_real: bool) -> torch.Tensor:
    """Relativistic average GAN loss: with ``fake_is_real`` False, the discriminator's (real judged
    more real than the average fake, and fake less real than the average real); True, the generator's."""
    rel_real = real - fake.mean()
    rel_fake = fake - real.mean()
    one, zero = torch.ones_like(rel_real), torch.zeros_like(rel_real)
    if fake_is_real:
        return (F.binary_cross_entropy_with_logits(rel_real, zero) + F.binary_cross_entropy_with_logits(rel_fake, one)) / 2
    return (F.binary_cross_entropy_with_logits(rel_real, one) + F.binary_cross_entropy_with_logits(rel_fake, zero)) / 2


class NRPObjective(Objective):
    """The purifier's training loss on a batch (see the module docstring). ``threat``: the SSP
    budget (the paper trains at Linf 16/255); ``feature_network``: the frozen model whose layer
    ``layer`` gives the features (described by ``feature_desc`` in configs and cards); steps/alpha:
    SSP's iterations and step size (default ``2.5 * eps / steps``)."""

    name = "nrp"
    defaults: ClassVar[dict[str, Any]] = {"layer": "", "steps": 5, "alpha": None, "feature_weight": 1.0, "pixel_weight": 1.0,
                "adv_weight": 0.0}

    def __init__(self, threat: ThreatModel, feature_network: nn.Module, feature_desc: str, **params: Any) -> None:
        self.feature_network = feature_network
        self.feature_desc = feature_desc
        super().__init__(threat, **params)
        p = self.params
        self.features = FeatureExtractor(feature_network, p["layer"])
        self.ssp = SSP(threat, layer=p["layer"], steps=p["steps"], alpha=p["alpha"])

    def validate(self) -> None:
        super().validate()
        p = self.params
        if not p["layer"]:
            raise RobustlabError("recipe 'nrp' needs the feature layer's name")
        if self.threat.norm not in SSP.norms:
            raise RobustlabError(f"purifier training perturbs with SSP, which takes {' or '.join(SSP.norms)}, "
                                 f"not {self.threat.norm}")
        for key in ("feature_weight", "pixel_weight", "adv_weight"):
            if not p[key] >= 0:
                raise RobustlabError(f"recipe 'nrp': {key} must be >= 0, got {p[key]}")
        if p["feature_weight"] + p["pixel_weight"] <= 0:
            raise RobustlabError("recipe 'nrp': the feature or the pixel loss must have a weight > 0")

    def rebuild(self, **params: Any) -> NRPObjective:
        return type(self)(self.threat, self.feature_network, self.feature_desc, **params)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "feature_network": self.feature_desc}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> torch.Tensor:
        """SSP against the feature network (the purifier plays no part). SSP ignores labels: it gets
        one dummy label per image whatever ``y`` is (per-image, or per-pixel on segmentation data)."""
        dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.ssp.run(self.feature_network, x, dummy, generator).x_adv

    def feature_loss(self, purified: torch.Tensor, clean_features: torch.Tensor) -> torch.Tensor:
        """Per-sample relative squared feature distance ``||F(purified) - F(x)||^2 / ||F(x)||^2``."""
        out = self.features(purified)
        scale = clean_features.flatten(1).square().sum(1).clamp_min(1e-12)
        return (out - clean_features).flatten(1).square().sum(1) / scale

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> tuple[torch.Tensor, Logs]:
        p = self.params
        x_adv = self.perturb(model, x, y, generator)
        with torch.no_grad():
            clean = self.features(x)
            before = self.feature_loss(x_adv, clean).mean()
        purifier = getattr(model, "purifier", model)
        raw = purifier.raw(x_adv) if hasattr(purifier, "raw") else model(x_adv)
        purified = raw.clamp(0.0, 1.0)
        feat = self.feature_loss(purified, clean).mean()
        # on the output before its clip: pixels pushed out of [0, 1] are pulled back (through the clip
        # alone they get no gradient, and a purifier once all outside the box stays dead: black images)
        pixel = (raw - x).square().mean()
        loss = p["feature_weight"] * feat + p["pixel_weight"] * pixel
        logs: Logs = {"feature_loss": feat.detach(), "feature_loss_unpurified": before, "pixel_loss": pixel.detach()}
        disc = getattr(model, "discriminator", None)
        if p["adv_weight"] > 0:
            if disc is None:
                raise RobustlabError("recipe 'nrp' with adv_weight > 0 trains a discriminator: wrap the purifier "
                                     "in PurifierTrainee(purifier, make_discriminator(channels))")
            real = disc(x)
            d_loss = _ragan(real, disc(purified.detach()), fake_is_real=False)
            g_loss = _ragan(_frozen_call(disc, x), _frozen_call(disc, purified), fake_is_real=True)
            loss = loss + p["adv_weight"] * g_loss + d_loss
            logs.update(adv_loss=g_loss.detach(), disc_loss=d_loss.detach())
        return loss, logs


@dataclass
class PurifierConfig:
    """What purifier to train, against which features, with which losses (see :class:`NRPObjective`).

    architecture/options: :func:`robustlab.models.purifier.build_purifier`; eps/norm: the SSP budget
    during training; steps/alpha: SSP's; layer: the feature layer ('' = :func:`default_layer`);
    train: the loop's optimisation settings (Adam at 1e-3, no weight decay, cosine schedule by default).
    """

    architecture: str = "residual"
    options: dict[str, int] = field(default_factory=dict)
    norm: str = "linf"
    eps: float = 16 / 255
    steps: int = 5
    alpha: float | None = None
    layer: str = ""
    feature_weight: float = 1.0
    pixel_weight: float = 1.0
    adv_weight: float = 0.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="cosine"))


@dataclass
class PurifierRun:
    """The trained purifier (eval mode), the loop's history, and the card's ``training`` record."""

    purifier: nn.Module
    history: TrainHistory
    record: dict[str, Any]


def train_purifier(
    data: Dataset,
    feature_network: nn.Module,
    feature_desc: str,
    config: PurifierConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    save_every: float | None = 300.0,
) -> PurifierRun:
    """Train a purifier on the images of ``data`` (labels ignored) against ``feature_network``
    (frozen: eval mode, no parameter gradients; ``feature_desc`` says what it is, e.g. its spec).
    Checkpoints go to ``checkpoint_dir`` after every epoch and every ``save_every`` seconds;
    ``resume`` continues the run saved there. Returns a :class:`PurifierRun`; save it with
    :func:`robustlab.models.purifier.save_purifier` (``record`` is the card's training field)."""
    config = config or PurifierConfig()
    device = torch.device(device)
    channels, height, width = data.image_shape
    feature_network = feature_network.to(device).eval()
    for param in feature_network.parameters():
        param.requires_grad_(False)
    layer = config.layer or default_layer(feature_network, (channels, height, width))
    threat = ThreatModel(config.norm, config.eps)
    objective = NRPObjective(threat, feature_network, feature_desc, layer=layer, steps=config.steps,
                             alpha=config.alpha, feature_weight=config.feature_weight,
                             pixel_weight=config.pixel_weight, adv_weight=config.adv_weight)
    torch.manual_seed(config.train.seed)  # the initial weights
    purifier = build_purifier(config.architecture, channels, **config.options)
    disc = make_discriminator(channels) if config.adv_weight > 0 else None
    trainee = PurifierTrainee(purifier, disc)
    history = train(trainee, data, config.train, objective, device=device, progress=progress, on_epoch=on_epoch,
                    checkpoint_dir=checkpoint_dir, resume=resume, save_every=save_every)
    purifier.eval()
    record = {
        "feature_network": feature_desc, "layer": layer,
        "ssp": {"norm": config.norm, "eps": config.eps, "steps": config.steps,
                "alpha": objective.ssp.step_size()},
        "losses": {"feature": config.feature_weight, "pixel": config.pixel_weight, "adversarial": config.adv_weight},
        "epochs": len(history), "images": len(data), "image_size": [height, width],
        "data": data.name, "optimizer": config.train.to_dict(),
        "final": {k: v for k, v in (history[-1] if history else {}).items() if isinstance(v, (int, float))},
    }
    return PurifierRun(purifier, history, record)
