"""Evaluations under the threat kinds of :mod:`robustlab.threat_kinds`, each as its own threat model.

- :func:`evaluate_spatial`: per-sample worst case over spatial attacks, like the Lp ensemble (only
  still-robust points are attacked by the next attack), with every counted point re-rendered from
  its parameters and re-predicted.
- :func:`evaluate_universal`: one perturbation fitted on a fit set (e.g. training images) and applied
  to every evaluation image; the reported number is the accuracy on the perturbed evaluation images
  among those classified correctly when clean, and the fooling rate (prediction changed).
- :func:`evaluate_patch`: one patch fitted on a fit set, placed on every evaluation image at random
  positions (``draws`` draws per image: the mean accuracy) and at the worst position of a grid (a
  point is robust only if no position fools it).

Every counted adversarial image is checked: its prediction is computed afresh through
:func:`robustlab.predictor.predict`, and it lies in the threat model (spatial: re-rendered from its
parameters; patch: changed pixels inside one square; universal: the per-image ball, and one
perturbation for all images). Each returns a :class:`StructuredResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.predictor import predict
from robustlab.threat_kinds import PatchThreat, SpatialThreat, UniversalThreat


@dataclass
class StructuredResult:
    """Summary of one evaluation: ``threat`` (its to_dict), ``n`` images, clean accuracy and the
    robust accuracies by name (fractions of all n images), per-sample ``robust`` (bool, the
    worst case), and extras (the attack's config, the fooling rate, counts)."""

    threat: dict[str, Any]
    n: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    robust: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"threat: {self.threat}", f"images: {self.n}", f"clean accuracy: {self.clean_accuracy:.2%}"]
        out += [f"robust accuracy ({k}): {v:.2%}" for k, v in self.robust_accuracy.items()]
        return out


def _batched_predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([predict(model, x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def _check_attack(attack: Attack, kind: type) -> None:
    if not isinstance(attack.threat, kind):
        raise RobustlabError(f"attack {attack.name!r} has threat {attack.threat}, not a {kind.__name__}")


def evaluate_spatial(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[Attack], generator: torch.Generator | None = None
) -> StructuredResult:
    """Worst case over ``attacks`` (all on one :class:`SpatialThreat`), only still-robust points
    attacked; a claimed point counts only if re-rendering it from its parameters gives it back and
    the model misclassifies it."""
    if not attacks:
        raise RobustlabError("a spatial evaluation needs at least one attack")
    threat = attacks[0].threat
    for a in attacks:
        _check_attack(a, SpatialThreat)
        if a.threat != threat:
            raise RobustlabError(f"all attacks need one threat model; {a.name} has {a.threat}, not {threat}")
    with eval_mode(model):
        correct = _batched_predict(model, x) == y
        robust = correct.clone()
        by_attack, rejected = {}, 0
        for a in attacks:
            idx = robust.nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                by_attack[a.name] = 0
                continue
            res = a.run(model, x[idx], y[idx], generator)
            claimed = res.success.nonzero(as_tuple=True)[0]
            if claimed.numel():
                ok = threat.verify(res.x_adv[claimed], x[idx[claimed]], res.params[claimed])
                ok &= _batched_predict(model, res.x_adv[claimed]) != y[idx[claimed]]
                robust[idx[claimed[ok]]] = False
                rejected += int((~ok).sum())
            by_attack[a.name] = int((correct & ~robust).sum()) - sum(by_attack.values())
    n = len(y)
    return StructuredResult(
        threat.to_dict(), n, float(correct.float().mean()), {"worst case": float(robust.float().mean())}, robust,
        {"attacks": [a.config() for a in attacks], "broken_by": by_attack, "rejected": rejected},
    )


def evaluate_universal(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> StructuredResult:
    """Fit ``attack``'s universal perturbation on (fit_x, fit_y), apply it to (x, y)."""
    _check_attack(attack, UniversalThreat)
    threat = attack.threat
    with eval_mode(model):
        delta, _, _, fit_fooled = attack.fit(model, fit_x, fit_y, generator)
        clean = _batched_predict(model, x)
        x_adv = threat.apply(x, delta)
        if not bool(threat.contains(x_adv, x).all()) or not threat.shared(x_adv, x):
            raise RobustlabError("internal error: the universal perturbation left its threat model")
        adv = _batched_predict(model, x_adv)
    correct = clean == y
    robust = correct & (adv == y)
    n = len(y)
    return StructuredResult(
        threat.to_dict(), n, float(correct.float().mean()), {"universal": float(robust.float().mean())}, robust,
        {"attack": attack.config(), "fooling_rate": float((adv != clean).float().mean()),
         "fit_images": len(fit_y), "fit_fooled": float(fit_fooled.float().mean()),
         "delta_norm": float(threat.distance(delta.unsqueeze(0), torch.zeros_like(delta).unsqueeze(0))[0])},
    )


def evaluate_patch(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    draws: int = 10, generator: torch.Generator | None = None,
) -> StructuredResult:
    """Fit ``attack``'s patch on (fit_x, fit_y); on (x, y): accuracy at ``draws`` random positions per
    image (the mean) and at the worst position of the attack's grid (its ``stride``)."""
    _check_attack(attack, PatchThreat)
    if draws < 1:
        raise RobustlabError(f"draws must be >= 1, got {draws}")
    threat = attack.threat
    _, _, h, w = x.shape
    with eval_mode(model):
        patch, _, _ = attack.fit(model, fit_x, fit_y, generator)
        correct = _batched_predict(model, x) == y
        hits = torch.zeros(len(y))
        for _ in range(draws):
            top, left = threat.random_locations(len(y), h, w, generator, device="cpu")
            x_adv = threat.apply(x, patch, top.to(x.device), left.to(x.device))
            assert bool(threat.contains(x_adv, x).all())
            hits += (correct & (_batched_predict(model, x_adv) == y)).float().cpu()
        worst = attack.rebuild(**{**attack.params, "locations": "worst"})
        robust = correct.clone()
        idx = correct.nonzero(as_tuple=True)[0]
        if idx.numel():
            res = worst.place(model, x[idx], y[idx], patch)
            claimed = res.success.nonzero(as_tuple=True)[0]
            ok = threat.contains(res.x_adv[claimed], x[idx[claimed]])
            ok &= _batched_predict(model, res.x_adv[claimed]) != y[idx[claimed]]
            robust[idx[claimed[ok]]] = False
    n = len(y)
    return StructuredResult(
        threat.to_dict(), n, float(correct.float().mean()),
        {"random position": float(hits.mean()) / draws, "worst position": float(robust.float().mean())}, robust,
        {"attack": attack.config(), "draws": draws, "fit_images": len(fit_y)},
    )
