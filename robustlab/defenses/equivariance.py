"""Robust perception through equivariance (Mao et al., ICML 2023): restore the equivariance of the
model's features at test time.

Given an input x (perhaps adversarial), the defense optimises a small correction delta, inside an Linf
budget ``factor * eps`` around x and inside the box [0, 1], so that the features of one layer of
the model are equivariant under random transformations T: F(T(x + delta)) = T(F(x + delta)). Then the
model classifies (or segments) x + delta. Per step it draws ``views`` random transformations per
image (resized crops, small rotations, flips, colour jitter: ``transforms``), runs the identity view
and the transformed views of every image as one batch through the model up to the feature layer,
maps each view's feature map back into the untransformed frame (the inverse transformation applied to
the map; vector features are compared as they are), and descends the loss ``1 - mean pairwise cosine
similarity`` of the views' features (over a random ``keep`` fraction of the feature positions, drawn
once per call, as the authors do).

The step follows the authors' code: the gradient, normalised per image, plus Gaussian noise whose
scale anneals linearly to 0 (``noise``), then its sign; the correction starts uniformly in the
budget. Where their code takes steps larger than the budget (each step jumps to a corner of it), the
step size here anneals linearly from ``step * budget`` to ``step * budget / steps``, so the last steps
refine. Their defaults: ``steps`` 20, ``views`` 8 (K = 8 transformations + the identity: 180
forward-backward passes per image), budget 1.5x the attack's epsilon (2.5x for adversarially trained
models), rotations up to 15 degrees, colour jitter 0.8 with 20% grayscale; the features of the
second-to-last stage.

Layer: ``layer`` names a module (``dict(model.named_modules())``); by default the last module whose
output is a spatial map (N, C, h, w), h * w > 1, other than the model's own output layer (the
penultimate stage of a CNN or a segmentation network), else the input of the last layer. The forward
pass stops at that layer (nothing after it is computed while optimising).

What an honest attacker needs (declared, so the evaluation pairs it): the correction draws random
numbers (``eot`` draws per gradient, predictions from ``draws``); ``attack``: ``bpda`` (default) passes
the gradient straight through the correction (Athalye et al.), ``unrolled`` differentiates the
unrolled optimisation (each sign step by its straight-through estimate; memory grows with steps x
views x batch); ``adaptive_weight`` > 0: the attacker also minimises the equivariance loss of its
input with this weight (:meth:`penalty`), so the defense finds little to correct.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.defenses.base import Defense, register_defense
from robustlab.defenses.equivariance_views import (
    Views,
    ViewSettings,
    apply_views,
    back_to_reference,
    draw_views,
    parse_kinds,
)
from robustlab.errors import RobustlabError

ATTACK_VIEWS = ("bpda", "unrolled")


def _fraction(text: str) -> float | None:
    """``"8/255"`` or ``"0.03"`` as a number (None if neither)."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None


class _Reached(Exception):
    """Raised by the feature hook to stop the forward pass at the feature layer."""


class _SignSTE(torch.autograd.Function):
    """sign(u) forward; the clipped identity backward (the straight-through estimate of sign)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return u.sign()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        return grad * (u.abs() <= 1).to(grad.dtype)


@register_defense
class Equivariance(Defense):
    """Test-time input correction restoring a layer's equivariance (Mao et al. 2023).

    Within ``factor * eps`` of the input, under random crops, rotations, flips and colour jitter (see
    the module doc).

    eps: the attack's Linf epsilon (pixels; required); factor: the correction's budget in units of
    eps; steps, views: optimisation steps and random transformations per step; step: first step size
    in units of the budget (annealed linearly); noise: scale of the annealed gradient noise; keep:
    fraction of feature positions in the loss; layer: feature module name (None: the default layer);
    transforms: ``+``-separated list of flip, crop, rotate, color (cycled over the views); crop, angle, jitter:
    their ranges; draws: predictions vote over this many corrections; eot: gradients an adaptive
    attack averages; attack: bpda or unrolled; adaptive_weight: weight of the equivariance loss the
    adaptive attacker minimises (0: none).
    """

    name = "equivariance"
    defaults: ClassVar[dict[str, Any]] = {
        "eps": None, "factor": 1.5, "steps": 20, "views": 8, "step": 1.0, "noise": 1.0, "keep": 0.1,
        "layer": None, "transforms": "crop+rotate+color+flip", "crop": 0.6, "angle": 15.0, "jitter": 0.8,
        "draws": 1, "eot": 4, "attack": "bpda", "adaptive_weight": 0.0,
    }
    choices: ClassVar[dict[str, tuple]] = {"attack": ATTACK_VIEWS}
    randomized = True

    def validate(self) -> None:
        p = self.params
        where = "defense 'equivariance'"
        if isinstance(p["eps"], str):
            p["eps"] = _fraction(p["eps"])
        if isinstance(p["layer"], float):  # layer=3 in a spec: the module named "3"
            p["layer"] = str(int(p["layer"])) if p["layer"].is_integer() else str(p["layer"])
        if p["eps"] is None or not 0 < float(p["eps"]) <= 1:
            raise RobustlabError(f"{where}: give eps, the attack's Linf epsilon in (0, 1] (the correction's budget "
                                 "is factor * eps), e.g. equivariance:eps=0.03137")
        for key in ("factor", "step"):
            if not float(p[key]) > 0:
                raise RobustlabError(f"{where}: {key} must be > 0, got {p[key]!r}")
        for key in ("steps", "views", "draws", "eot"):
            if int(p[key]) < 1:
                raise RobustlabError(f"{where}: {key} must be >= 1, got {p[key]!r}")
        if not 0 < float(p["keep"]) <= 1:
            raise RobustlabError(f"{where}: keep must be in (0, 1], got {p['keep']!r}")
        if float(p["noise"]) < 0 or float(p["adaptive_weight"]) < 0:
            raise RobustlabError(f"{where}: noise and adaptive_weight must be >= 0")
        if not 0.1 <= float(p["crop"]) <= 1 or not 0 <= float(p["angle"]) <= 90 or not 0 <= float(p["jitter"]) < 1:
            raise RobustlabError(f"{where}: crop must be in [0.1, 1], angle in [0, 90], jitter in [0, 1)")
        self.settings = ViewSettings(parse_kinds(p["transforms"]), float(p["crop"]), float(p["angle"]),
                                     float(p["jitter"]))
        self.model: nn.Module | None = None
        self._layer: nn.Module | None = None
        self._layer_name: str | None = None
        self.reset_cost()

    # ------------------------------------------------------------------ declarations

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        """BPDA (identity) unless the attacker differentiates the unrolled correction."""
        return self.params["attack"] == "unrolled"

    @property
    def iterative(self) -> bool:  # type: ignore[override]
        """The attacker differentiates the unrolled optimisation (``attack=unrolled``)."""
        return self.params["attack"] == "unrolled"

    @property
    def attack_draws(self) -> int:
        return int(self.params["eot"])

    @property
    def has_penalty(self) -> bool:
        return float(self.params["adaptive_weight"]) > 0

    @property
    def budget(self) -> float:
        """The correction's Linf budget (pixels): ``factor * eps``."""
        return float(self.params["factor"]) * float(self.params["eps"])

    @property
    def passes_per_image(self) -> int:
        """Forward-backward passes (to the feature layer) one correction spends per image."""
        return int(self.params["steps"]) * (int(self.params["views"]) + 1)

    def reset_cost(self) -> None:
        """Zero the counters: ``cost["images"]`` corrected, ``cost["passes"]`` image-passes (forward
        and backward to the feature layer, summed over images), ``cost["calls"]``."""
        self.cost = {"calls": 0, "images": 0, "passes": 0}

    # ------------------------------------------------------------------ the model and its layer

    def bind(self, model: nn.Module) -> None:
        self.model = model
        self._layer = self._layer_name = None
        if self.params["layer"] is not None:
            modules = dict(model.named_modules())
            name = str(self.params["layer"])
            if name not in modules or name == "":
                known = [n for n in modules if n]
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise RobustlabError(f"defense 'equivariance': the model has no layer {name!r} (its layers: {shown})")
            self._layer, self._layer_name = modules[name], name

    @property
    def layer_name(self) -> str | None:
        """The feature layer's module name (resolved at the first call when left to the default)."""
        return self._layer_name

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RobustlabError("defense 'equivariance' runs the model: use it behind a model "
                                 "(DefendedModel / --defense), or call bind(model) first")
        return self.model

    def _resolve_default_layer(self, x: torch.Tensor) -> None:
        """The last leaf module with a spatial output other than the last one run, else the one before it."""
        model = self._require_model()
        names = {m: n for n, m in model.named_modules()}
        seen: list[tuple[nn.Module, torch.Size]] = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, o.shape)) if torch.is_tensor(o) else None)
                 for m in model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            for h in hooks:
                h.remove()
        if len(seen) < 2:
            raise RobustlabError("defense 'equivariance': the model has no intermediate layer to take features "
                                 "from; name one with layer=NAME")
        body = seen[:-1]
        spatial = [m for m, s in body if len(s) == 4 and s[2] * s[3] > 1]
        self._layer = spatial[-1] if spatial else body[-1][0]
        self._layer_name = names[self._layer]

    @contextmanager
    def _tap(self) -> Iterator[dict[str, torch.Tensor]]:
        """While open, a forward pass of the model stops at the feature layer with its output in the
        yielded dict under "f" (catch :class:`_Reached`)."""
        out: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out["f"] = output
            raise _Reached

        handle = self._layer.register_forward_hook(hook)
        try:
            yield out
        finally:
            handle.remove()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature layer's output for the batch ``x`` (the forward pass stops there)."""
        model = self._require_model()
        if self._layer is None:
            self._resolve_default_layer(x)
        with self._tap() as out:
            try:
                model(x)
            except _Reached:
                pass
        if "f" not in out:
            raise RobustlabError(f"defense 'equivariance': the layer {self._layer_name!r} is not used by the "
                                 "model's forward pass; name another with layer=NAME")
        return out["f"]

    # ------------------------------------------------------------------ the objective

    def _keep_mask(self, shape: torch.Size, generator: torch.Generator | None, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """The positions of the features in the loss: a random ``keep`` fraction (at least one) of the
        spatial positions of a map, or of the entries of a vector; one draw per call."""
        size = shape[2:] if len(shape) == 4 else shape[1:]
        r = torch.rand(tuple(size), generator=generator, device=device)
        keep = r < float(self.params["keep"])
        keep.view(-1)[r.view(-1).argmin()] = True
        mask = keep.to(dtype)
        return mask.view(1, 1, *size) if len(shape) == 4 else mask.view(1, -1)

    def _loss(self, x: torch.Tensor, views: Views, keep_mask: torch.Tensor | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-image equivariance loss (N,), the keep mask used) at ``x`` for the given views: one
        batched pass of the identity and transformed views to the feature layer."""
        n = x.shape[0]
        f = self.features(torch.cat([x, apply_views(x, views)]))
        if keep_mask is None:
            keep_mask = self._keep_mask(f.shape, generator, f.device, f.dtype)
        ref, back = f[:n], f[n:]
        back, seen = back_to_reference(back, views)
        if seen is not None:
            back = back * seen
        stacked = torch.cat([ref, back]) * keep_mask
        flat = stacked.flatten(1)
        flat = flat / (flat.pow(2).sum(dim=1, keepdim=True) + 1e-24).sqrt()  # smooth at 0 (second derivatives)
        v = flat.view(views.k + 1, n, -1).transpose(0, 1)
        gram = v @ v.transpose(1, 2)  # (N, k+1, k+1) cosine similarities
        k1 = views.k + 1
        upper = torch.triu(torch.ones(k1, k1, dtype=torch.bool, device=x.device), diagonal=1)
        return 1 - gram[:, upper].mean(dim=1), keep_mask

    def equivariance_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The per-image equivariance loss (N,) at ``x``, in [0, 2] (0: the features of all views
        agree), for one random draw of views; differentiable in ``x``."""
        self._require_model()
        views = draw_views(x.shape[0], int(self.params["views"]), self.settings, generator, x.device, x.dtype)
        return self._loss(x, views, None, generator)[0]

    def penalty(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``adaptive_weight`` times the equivariance loss at ``x`` (None when the weight is 0): what the
        adaptive attacker subtracts from its loss."""
        weight = float(self.params["adaptive_weight"])
        return weight * self.equivariance_loss(x, generator) if weight > 0 else None

    # ------------------------------------------------------------------ the correction

    def correct(self, x: torch.Tensor, generator: torch.Generator | None = None, graph: bool = False) -> torch.Tensor:
        """The corrected batch ``x + delta`` (inside the budget and [0, 1]). ``graph``: keep the graph of
        the whole optimisation (the unrolled attacker's view), else ``delta`` carries no gradient."""
        self._require_model()
        graph = graph and x.requires_grad and torch.is_grad_enabled()
        p = self.params
        steps, k, budget = int(p["steps"]), int(p["views"]), self.budget
        noise, step = float(p["noise"]), float(p["step"])
        n = x.shape[0]
        u0 = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_ref = x if graph else x.detach()
        delta = (x_ref + (2 * u0 - 1) * budget).clamp(0, 1) - x_ref
        keep_mask = None
        with torch.enable_grad():
            for t in range(steps):
                views = draw_views(n, k, self.settings, generator, x.device, x.dtype)
                if graph:
                    xc = x_ref + delta
                else:
                    xc = (x_ref + delta).detach().requires_grad_(True)
                loss, keep_mask = self._loss(xc, views, keep_mask, generator)
                (g,) = torch.autograd.grad(loss.sum(), xc, create_graph=graph)
                rms = (g.flatten(1).pow(2).mean(dim=1) + 1e-24).sqrt().view(-1, *[1] * (x.dim() - 1))
                u = g / rms
                scale = noise * (steps - 1 - t) / steps
                if scale > 0:
                    u = u + scale * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                direction = _SignSTE.apply(u) if graph else u.sign()
                alpha = step * budget * (steps - t) / steps
                delta = (delta - alpha * direction).clamp(-budget, budget)
                delta = (x_ref + delta).clamp(0, 1) - x_ref
                if not graph:
                    delta = delta.detach()
        self.cost["calls"] += 1
        self.cost["images"] += n
        self.cost["passes"] += n * steps * (k + 1)
        out = (x_ref + delta).clamp(0, 1)
        if graph:
            return out
        return out.detach() + (x - x.detach())  # the value of out; the identity gradient w.r.t. x (BPDA's own)

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.correct(x, generator, graph=False)

    def attack_transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.correct(x, generator, graph=self.params["attack"] == "unrolled")
