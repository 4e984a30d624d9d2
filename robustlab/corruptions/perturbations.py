"""Perturbation sequences in the ImageNet-P style (Hendrycks & Dietterich, 2019) and their stability
metrics: flip probability, flip rate (FR, normalized by a baseline) and mFR, top-5 distance (T5D).

A perturbation turns a batch (N, C, H, W) in [0, 1] into ``frames`` frames that change a little
from one to the next: noise redrawn per frame (gaussian, shot), a blur whose angle or zoom grows
(motion, zoom), snow that falls, brightness that rises, and geometric drifts (translate, rotate, tilt,
scale). ``seq.frames(x, generator)`` yields the frames one by one (each (N, C, H, W), batched), so a
long sequence never sits in memory; everything random is drawn from the generator (one draw per
image for the sequence's start, one per frame for the noise).

Stability (:func:`sequence_stability`): for a classifier f and sequences x_1..x_T,
flip probability FP = mean over sequences and t >= 2 of 1[f(x_t) != f(x_{t-1})], except for noise
sequences, whose frames are independent draws on the same image, where x_t is compared with x_1.
FR_p = FP_p / FP_p(baseline), mFR its mean over perturbations. The top-5 distance between frames
is d = sum_{i=1..5} |min(i, 6) - min(sigma(i), 6)| with sigma(i) the rank in the earlier frame of the
class ranked i-th in the later one (the paper's sum over j of 1(1 <= j - 1 <= 5)); uT5D is its mean,
mT5D its baseline-normalized mean (:class:`robustlab.eval.metrics.FlipRate` holds the counts;
:func:`robustlab.eval.stability.perturbation_stability` runs a model over a data set).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from robustlab.corruptions import imaging, ops
from robustlab.corruptions.mnist_c import shift_value
from robustlab.errors import RobustlabError
from robustlab.params import Configurable, parse_spec
from robustlab.registry import Registry


class Perturbation(Configurable):
    """Base: ``frames`` (sequence length, default 31 as ImageNet-P) and ``step`` (how much changes per
    frame, in the unit of each perturbation); ``noise`` says frames are redraws (compared with the
    first frame)."""

    component: ClassVar[str] = "perturbation"
    defaults: ClassVar[dict[str, Any]] = {"frames": 31, "step": 1.0}
    noise: ClassVar[bool] = False
    family: ClassVar[str] = ""

    def validate(self) -> None:
        if self.params["frames"] < 2:
            raise RobustlabError(f"{self.owner}: frames must be >= 2, got {self.params['frames']}")
        if self.params["step"] <= 0:
            raise RobustlabError(f"{self.owner}: step must be > 0, got {self.params['step']}")

    def frames(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """The frames of every image's sequence, one (N, C, H, W) batch in [0, 1] per frame."""
        if x.dim() != 4:
            raise RobustlabError(f"{self.owner} takes a batch (N, C, H, W), got shape {tuple(x.shape)}")
        x = x.float()
        state = self.start(x, generator)
        for t in range(self.params["frames"]):
            yield self.frame(x, t, state, generator).clamp(0, 1)

    def start(self, x: torch.Tensor, generator: torch.Generator | None) -> Any:
        """Per-image draws made once per sequence (directions, textures)."""
        return None

    def frame(self, x: torch.Tensor, t: int, state: Any, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


PERTURBATIONS: Registry[type[Perturbation]] = Registry("perturbation")


def _register(cls: type[Perturbation]) -> type[Perturbation]:
    return PERTURBATIONS.register(cls.name)(cls)


def create_perturbation(spec: str, **params: Any) -> Perturbation:
    """A perturbation from ``NAME[:frames=T,step=S]``."""
    name, parsed = parse_spec(spec, "perturbation")
    return PERTURBATIONS.get(name)(**{**parsed, **params})


def _size(x: torch.Tensor) -> float:
    return min(x.shape[-2:]) / 32.0  # geometric steps are given for 32 px and scale with the image


@_register
class GaussianNoiseP(Perturbation):
    """Gaussian noise of sd 0.04 * step, redrawn every frame."""

    name, family, noise = "gaussian_noise", "noise", True

    def frame(self, x, t, state, generator):
        sd = 0.04 * self.params["step"]
        return x + sd * torch.randn(x.shape, generator=generator, device=x.device)


@_register
class ShotNoiseP(Perturbation):
    """Poisson noise with 60 / step photons per unit, redrawn every frame."""

    name, family, noise = "shot_noise", "noise", True

    def frame(self, x, t, state, generator):
        lam = 60.0 / self.params["step"]
        return torch.poisson(x * lam, generator=generator) / lam


@_register
class MotionBlurP(Perturbation):
    """Motion blur (radius 3 * step px at 32 px, sigma 1.5) whose angle turns 4 degrees per frame from
    a random start."""

    name, family = "motion_blur", "blur"

    def start(self, x, generator):
        return ops.uniform((x.shape[0],), -45.0, 45.0, generator, x.device)

    def frame(self, x, t, state, generator):
        radius = max(1.0, 3 * self.params["step"] * _size(x))
        return imaging.motion_blur(x, round(radius), 1.5 * _size(x), state + 4.0 * t)


@_register
class ZoomBlurP(Perturbation):
    """Zoom blur: the average of the image zoomed in by 1 ... 1 + 0.01 * step * t (bilinear)."""

    name, family = "zoom_blur", "blur"

    def start(self, x, generator):
        return {"sum": x.clone()}  # the running sum of the zooms so far (frames come in order)

    def frame(self, x, t, state, generator):
        if t > 0:
            n, _, h, w = x.shape
            z = 1 + 0.01 * self.params["step"] * t
            lin = torch.eye(2, device=x.device).div(z).expand(n, 2, 2)
            state["sum"] = state["sum"] + ops.affine_warp(x, ops.centered(lin, h, w))
        return state["sum"] / (t + 1)


@_register
class SnowP(Perturbation):
    """Snow flakes (a sparse blurred layer drawn once per image) falling 1 px * step per frame, over an
    image brightened towards white as in ImageNet-C's snow."""

    name, family = "snow", "weather"

    def start(self, x, generator):
        n, _, h, w = x.shape
        extra = math.ceil(self.params["step"] * _size(x) * self.params["frames"]) + 1
        layer = torch.randn((n, 1, h + extra, w), generator=generator, device=x.device) * 0.3 + 0.1
        layer = torch.where(layer > 0.5, layer, torch.zeros_like(layer))
        return imaging.gaussian_blur(layer, 0.5), extra

    def frame(self, x, t, state, generator):
        layer, extra = state
        h = x.shape[-2]
        off = round(self.params["step"] * _size(x) * t)
        top = extra - off - 1
        flakes = layer[:, :, top: top + h]
        base = 0.8 * x + 0.2 * torch.maximum(x, x * 1.5 + 0.5)
        return base + flakes


@_register
class BrightnessP(Perturbation):
    """HSV value shifted from -0.1 by 0.01 * step per frame."""

    name, family = "brightness", "digital"

    def frame(self, x, t, state, generator):
        return shift_value(x, -0.1 + 0.01 * self.params["step"] * t)


@_register
class TranslateP(Perturbation):
    """A shift growing by step px (at 32 px) per frame, in a random direction per image (zeros come in)."""

    name, family = "translate", "geometric"

    def start(self, x, generator):
        return ops.uniform((x.shape[0],), 0.0, 2 * math.pi, generator, x.device)

    def frame(self, x, t, state, generator):
        n = x.shape[0]
        d = self.params["step"] * _size(x) * t
        shift = torch.stack([d * torch.cos(state), d * torch.sin(state)], -1).unsqueeze(-1)
        eye = torch.eye(2, device=x.device).expand(n, 2, 2)
        return ops.affine_warp(x, torch.cat([eye, shift], -1))


@_register
class RotateP(Perturbation):
    """A rotation about the centre growing by step degrees per frame, direction random per image."""

    name, family = "rotate", "geometric"

    def start(self, x, generator):
        return ops.random_sign(x.shape[0], generator, x.device)

    def frame(self, x, t, state, generator):
        h, w = x.shape[-2:]
        a = torch.deg2rad(state * self.params["step"] * t)
        return ops.affine_warp(x, ops.centered(ops.rotation(a), h, w))


@_register
class ScaleP(Perturbation):
    """A zoom about the centre by (1 + 0.01 * step) per frame, in or out at random per image."""

    name, family = "scale", "geometric"

    def start(self, x, generator):
        return ops.random_sign(x.shape[0], generator, x.device)

    def frame(self, x, t, state, generator):
        n, _, h, w = x.shape
        z = (1 + 0.01 * self.params["step"]) ** (state * t)
        lin = torch.eye(2, device=x.device).unsqueeze(0) / z.view(n, 1, 1)
        return ops.affine_warp(x, ops.centered(lin, h, w))


@_register
class TiltP(Perturbation):
    """A perspective tilt: the image plane turns by step degrees per frame about an axis through the
    centre at a random angle per image (pinhole camera at one image width)."""

    name, family = "tilt", "geometric"

    def start(self, x, generator):
        return ops.uniform((x.shape[0],), 0.0, math.pi, generator, x.device)

    def frame(self, x, t, state, generator):
        n, _, h, w = x.shape
        phi = torch.deg2rad(torch.full((n,), self.params["step"] * t, device=x.device))
        v = torch.linspace(-1, 1, h, device=x.device).view(1, h, 1)
        u = torch.linspace(-1, 1, w, device=x.device).view(1, 1, w)
        ca, sa = torch.cos(state).view(n, 1, 1), torch.sin(state).view(n, 1, 1)
        along = u * ca + v * sa  # coordinate across the tilt axis
        across = -u * sa + v * ca
        f = 2.0  # focal length in half-widths
        c, s = torch.cos(phi).view(n, 1, 1), torch.sin(phi).view(n, 1, 1)
        depth = f + along * s
        a2 = along * c * f / depth
        b2 = across * f / depth
        gx = a2 * ca - b2 * sa
        gy = a2 * sa + b2 * ca
        grid = torch.stack([gx, gy], -1)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


PERTURBATION_SUITE = ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow", "brightness",
                      "translate", "rotate", "tilt", "scale")


def top5_distance(prev_rank: torch.Tensor, top5: torch.Tensor) -> torch.Tensor:
    """(N,) top-5 distance between an earlier frame (``prev_rank``: (N, K), each class's 0-based rank)
    and a later one (``top5``: (N, 5) its five best classes in order)."""
    sigma = prev_rank.gather(1, top5) + 1  # 1-based rank in the earlier frame of the i-th class now
    i = torch.arange(1, top5.shape[1] + 1, device=top5.device).view(1, -1)
    return (i.clamp(max=6) - sigma.clamp(max=6)).abs().sum(dim=1)


def _ranks(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = logits.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank, order[:, :5]


@torch.no_grad()
def sequence_stability(model: torch.nn.Module, x: torch.Tensor, perturbation: Perturbation,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per image of the batch ``x``: how many of the sequence's frame pairs flipped the top-1 class
    (``flips``), the summed top-5 distance (``t5d``) and the number of pairs (``pairs``, T - 1).
    Noise sequences compare every frame with the first, the others each with the one before."""
    first = prev_rank = prev_pred = None
    flips = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    t5d = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for frame in perturbation.frames(x, generator):
        logits = model(frame)
        if logits.shape[1] < 5:
            raise RobustlabError(f"the top-5 distance needs at least 5 classes, the model has {logits.shape[1]}")
        rank, top5 = _ranks(logits)
        pred = top5[:, 0]
        if first is None:
            first = (rank, pred)
        else:
            ref_rank, ref_pred = first if perturbation.noise else (prev_rank, prev_pred)
            flips += (pred != ref_pred).long()
            t5d += top5_distance(ref_rank, top5)
        prev_rank, prev_pred = rank, pred
    pairs = torch.full_like(flips, perturbation.params["frames"] - 1)
    return {"flips": flips, "t5d": t5d, "pairs": pairs}

