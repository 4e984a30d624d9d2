"""Adversarial patches (Brown, Mane, Roy, Abadi & Gilmer 2017, "Adversarial patch"): one square
patch, universal and location-free, within a :class:`robustlab.threat_kinds.PatchThreat`.

Training is expectation over transformation across locations: every step pastes the patch at an
independently drawn uniform location in each image of a minibatch and takes a signed gradient
step of size ``lr`` on the patch, up the mean cross-entropy of the true labels (targeted: down the
targets'), keeping the patch in the box. The patch starts as uniform noise; training runs
``epochs`` passes over the images in a random order each and stops early once every image is
fooled at the locations of its last step.

Evaluation places the trained patch on each image at ``locations``: ``worst`` tries every position
on a grid of stride ``stride`` (in order, the last row and column always included) and stops at the
first that the model misclassifies; ``random`` uses one uniformly random position. The point
returned for an unbroken sample is the patch at its highest-loss position tried; ``params`` holds each
sample's (row, column) of the patch's top-left corner.

``run`` fits the patch on the batch; :meth:`AdversarialPatch.fit` gives the patch itself, e.g.
trained on training images and evaluated on test images
(:func:`robustlab.eval.structured.evaluate_patch`). Costs per image: one gradient per training step
it takes part in, one forward per position evaluated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError


def patch_positions(h: int, w: int, size: int, stride: int) -> torch.Tensor:
    """(K, 2) top-left positions (row, column) on a grid of ``stride`` covering every edge."""

    def axis(side: int) -> list[int]:
        last = side - size
        out = list(range(0, last + 1, stride))
        return out if out[-1] == last else [*out, last]

    return torch.cartesian_prod(torch.tensor(axis(h)), torch.tensor(axis(w))).view(-1, 2)


@register_attack
class AdversarialPatch(Attack):
    """A universal, location-free adversarial patch (EOT over locations).

    epochs: passes over the images; batch_size: images per step; lr: signed step on the patch;
    locations: ``worst`` (grid of positions with ``stride``) or ``random``; stride: grid spacing.
    """

    name = "patch"
    norms = ("patch",)
    defaults = {"epochs": 20, "batch_size": 32, "lr": 0.05, "locations": "worst", "stride": 2}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("epochs", "batch_size", "stride"):
            if p[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {p[key]}")
        if not p["lr"] > 0:
            raise RobustlabError(f"attack {self.name!r}: lr must be > 0, got {p['lr']}")
        if p["locations"] not in ("worst", "random"):
            raise RobustlabError(f"attack {self.name!r}: locations must be 'worst' or 'random', got {p['locations']!r}")

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if self.targeted else ce

    def fit(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patch (C, s, s) for the images ``x``, and per image the gradients and forwards spent.
        ``model`` must be in eval mode (``run`` sees to it)."""
        t, p = self.threat, self.params
        n, c, h, w = x.shape
        t.check_image(h, w)
        dev = x.device
        # drawn where the generator lives (its locations and order are drawn on the CPU), then moved
        where = generator.device if generator is not None else dev
        patch = torch.rand(c, t.size, t.size, generator=generator, device=where, dtype=x.dtype).to(dev)
        patch = patch * (t.upper - t.lower) + t.lower
        grads = torch.zeros(n, dtype=torch.long, device=dev)
        for _ in range(p["epochs"]):
            order = torch.randperm(n, generator=generator, device="cpu").to(dev)
            fooled = torch.ones(n, dtype=torch.bool, device=dev)
            for i in range(0, n, p["batch_size"]):
                idx = order[i : i + p["batch_size"]]
                top, left = t.random_locations(len(idx), h, w, generator, device="cpu")
                q = patch.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = check_logits(model(t.apply(x[idx], q, top.to(dev), left.to(dev))), len(idx))
                    (g,) = torch.autograd.grad(self._loss(logits, y[idx]).mean(), q)
                grads[idx] += 1
                fooled[idx] = self.is_success(logits.detach(), y[idx])
                patch = (patch + p["lr"] * g.sign()).clamp(t.lower, t.upper)
            if bool(fooled.all()):
                break
        return patch.detach(), grads, grads.clone()

    def place(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, patch: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        """The patch on each image at the attack's ``locations`` (see the module docstring); counts
        only the forwards of this evaluation. ``model`` must be in eval mode."""
        t = self.threat
        n, _, h, w = x.shape
        dev = x.device
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
        if self.params["locations"] == "random":
            top, left = t.random_locations(n, h, w, generator, device="cpu")
            x_adv = t.apply(x, patch, top.to(dev), left.to(dev))
            with torch.no_grad():
                success = self.is_success(check_logits(model(x_adv), n), y)
            return AttackResult(x_adv, success, torch.zeros_like(forwards), forwards + 1,
                                params=torch.stack([top, left], dim=1).to(dev))
        pos = patch_positions(h, w, t.size, self.params["stride"]).to(dev)
        x_adv = t.apply(x, patch, pos[:1, 0].expand(n), pos[:1, 1].expand(n))
        where = pos[:1].expand(n, 2).clone()
        best = torch.full((n,), -float("inf"), dtype=x.dtype, device=dev)
        success = torch.zeros(n, dtype=torch.bool, device=dev)
        live = torch.arange(n, device=dev)
        with torch.no_grad():
            for k in range(pos.shape[0]):
                if live.numel() == 0:
                    break
                m = live.numel()
                cand = t.apply(x[live], patch, pos[k, 0].expand(m), pos[k, 1].expand(m))
                logits = check_logits(model(cand), m)
                forwards[live] += 1
                loss = self._loss(logits, y[live])
                hit = self.is_success(logits, y[live])
                better = (loss > best[live]) | hit
                x_adv[live[better]] = cand[better]
                where[live[better]] = pos[k]
                best[live[better]] = loss[better]
                success[live[hit]] = True
                live = live[~hit]
        return AttackResult(x_adv, success, torch.zeros_like(forwards), forwards, params=where)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        patch, grads, fwds = self.fit(model, x, y, generator)
        result = self.place(model, x, y, patch, generator)
        result.gradients += grads
        result.forwards += fwds
        return result
