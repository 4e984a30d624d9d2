"""Evaluations under the threat kinds of :mod:`robustlab.threat_kinds`, each as its own threat model.

The pieces, used alike by the library calls below and by the structured protocol
(:mod:`robustlab.eval.protocols.structured`, which runs them batch by batch into the store):

- :func:`spatial_batch`: per-sample worst case over spatial attacks, like the Lp ensemble (only
  still-robust points are attacked by the next attack), every counted point re-rendered from its
  parameters and re-predicted.
- :func:`fit_universal` + :func:`universal_batch`: one perturbation fitted on a fit set (e.g. training
  images), applied to every evaluation image: robust when classified correctly clean and perturbed;
  fooled when the prediction changed.
- :func:`fit_patch` + :func:`patch_batch`: one patch fitted on a fit set, placed on every evaluation
  image at ``draws`` random positions (the mean accuracy) and at the worst position of the attack's
  grid (a point is robust only if no position fools it).

Every counted adversarial image is checked: its prediction is computed afresh through
:func:`robustlab.predictor.predict`, and it lies in the threat model (spatial: re-rendered from its
parameters; patch: changed pixels inside one square; universal: the per-image ball, and one
perturbation for all images). Each batch function returns a :class:`BatchOutcome` (per sample);
the library calls :func:`evaluate_spatial`, :func:`evaluate_universal` and :func:`evaluate_patch`
run them on one batch and return a :class:`StructuredResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import Attack
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.predictor import predict
from robustlab.threat_kinds import PatchThreat, SpatialThreat, UniversalThreat

RANDOM_POSITION = "patch-random"  # the names under which patch predictions are recorded
WORST_POSITION = "patch-worst"


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


@dataclass
class BatchOutcome:
    """Per sample of one batch (CPU tensors / lists of length N): the clean prediction, correct,
    robust (worst case), the prediction on the counted adversarial image (None: not attacked), each
    attack's prediction on its own image, the attack that broke it (verified), what fooled it where
    the threat has parameters (spatial (angle, dx, dy), NaN where nothing did; patch: the worst
    position (row, column), -1 where none), patch: random positions still correct (of ``draws``),
    universal: prediction changed; gradients and forwards spent; per attack {seconds, gradients,
    forwards}; claims rejected by verification."""

    clean_pred: torch.Tensor
    correct: torch.Tensor
    robust: torch.Tensor
    adv_pred: list[int | None]
    attack_preds: list[dict[str, int]]
    broken_by: list[str | None]
    gradients: torch.Tensor
    forwards: torch.Tensor
    costs: list[dict[str, float]]
    rejected: int = 0
    spatial: torch.Tensor | None = None
    position: torch.Tensor | None = None
    random_correct: torch.Tensor | None = None
    fooled: torch.Tensor | None = None


def _batched_predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([predict(model, x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def _check_attack(attack: Attack, kind: type) -> None:
    if not isinstance(attack.threat, kind):
        raise RobustlabError(f"attack {attack.name!r} has threat {attack.threat}, not a {kind.__name__}")


def check_spatial_attacks(attacks: list[Attack]) -> SpatialThreat:
    """The one :class:`SpatialThreat` every attack of ``attacks`` works in."""
    if not attacks:
        raise RobustlabError("a spatial evaluation needs at least one attack")
    threat = attacks[0].threat
    for a in attacks:
        _check_attack(a, SpatialThreat)
        if a.threat != threat:
            raise RobustlabError(f"all attacks need one threat model; {a.name} has {a.threat}, not {threat}")
    return threat


def _start(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    clean = _batched_predict(model, x)
    return clean, clean == y, len(y)


def _outcome(clean: torch.Tensor, correct: torch.Tensor, robust: torch.Tensor, n: int, **kw: Any) -> BatchOutcome:
    base = {"adv_pred": [None] * n, "attack_preds": [{} for _ in range(n)], "broken_by": [None] * n,
            "gradients": torch.zeros(n, dtype=torch.long), "forwards": torch.zeros(n, dtype=torch.long), "costs": []}
    return BatchOutcome(clean.cpu(), correct.cpu(), robust.cpu(), **{**base, **kw})


# ---------------------------------------------------------------------- spatial


def spatial_batch(
    model: nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
    status: Callable[[str, int], None] | None = None,
) -> BatchOutcome:
    """Worst case over ``attacks`` (all on one :class:`SpatialThreat`), only still-robust points
    attacked; a claimed point counts only if re-rendering it from its parameters gives it back and
    the model misclassifies it."""
    threat = check_spatial_attacks(attacks)
    with eval_mode(model):
        clean, correct, n = _start(model, x, y)
        out = _outcome(clean, correct, correct.clone(), n, spatial=torch.full((n, 3), float("nan")))
        for a in attacks:
            idx = out.robust.nonzero(as_tuple=True)[0]
            t0 = time.perf_counter()
            if idx.numel() == 0:
                out.costs.append({"seconds": 0.0, "gradients": 0, "forwards": 0})
                continue
            if status:
                status(a.name, int(idx.numel()))
            dev = idx.to(x.device)
            res = a.run(model, x[dev], y[dev], generator)
            pred = _batched_predict(model, res.x_adv)
            ok = res.success & threat.verify(res.x_adv, x[dev], res.params) & (pred != y[dev])
            out.rejected += int((res.success & ~ok).sum())
            pred, ok, params = pred.cpu(), ok.cpu(), res.params.detach().cpu().float()
            for j, i in enumerate(idx.tolist()):
                out.attack_preds[i][a.name] = int(pred[j])
                if ok[j]:
                    out.broken_by[i], out.adv_pred[i] = a.name, int(pred[j])
                    out.spatial[i] = params[j]
            out.robust[idx[ok]] = False
            out.gradients[idx] += res.gradients.cpu()
            out.forwards[idx] += res.forwards.cpu() + 1
            out.costs.append({"seconds": time.perf_counter() - t0, "gradients": int(res.gradients.sum()),
                              "forwards": int(res.forwards.sum()) + int(idx.numel())})
        for i in out.robust.nonzero(as_tuple=True)[0].tolist():  # unbroken: the last attack's point
            out.adv_pred[i] = out.attack_preds[i][attacks[-1].name]
    return out


def evaluate_spatial(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[Attack], generator: torch.Generator | None = None
) -> StructuredResult:
    """:func:`spatial_batch` on ``(x, y)`` as one batch."""
    out = spatial_batch(model, attacks, x, y, generator)
    broken = {a.name: sum(b == a.name for b in out.broken_by) for a in attacks}
    return StructuredResult(
        attacks[0].threat.to_dict(), len(y), float(out.correct.float().mean()),
        {"worst case": float(out.robust.float().mean())}, out.robust,
        {"attacks": [a.config() for a in attacks], "broken_by": broken, "rejected": out.rejected},
    )


# ---------------------------------------------------------------------- universal


def fit_universal(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``attack``'s universal perturbation (C, H, W) fitted on (fit_x, fit_y), and a record of the fit
    (images, fraction of them fooled, the perturbation's norm, gradients, seconds)."""
    _check_attack(attack, UniversalThreat)
    threat = attack.threat
    t0 = time.perf_counter()
    with eval_mode(model):
        delta, grads, _, fooled = attack.fit(model, fit_x, fit_y, generator)
    zero = torch.zeros_like(delta).unsqueeze(0)
    return delta, {"n": len(fit_y), "fooled": float(fooled.float().mean()), "gradients": int(grads.sum()),
                   "norm": float(threat.distance(delta.unsqueeze(0), zero)[0]),
                   "seconds": round(time.perf_counter() - t0, 3)}


def universal_batch(model: nn.Module, threat: UniversalThreat, delta: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, name: str = "uap") -> BatchOutcome:
    """The perturbation ``delta`` applied to every image of the batch (checked: each image in the
    ball, one perturbation for all)."""
    with eval_mode(model):
        clean, correct, n = _start(model, x, y)
        t0 = time.perf_counter()
        x_adv = threat.apply(x, delta.to(x.device, x.dtype))
        if not bool(threat.contains(x_adv, x).all()) or not threat.shared(x_adv, x):
            raise RobustlabError("internal error: the universal perturbation left its threat model")
        adv = _batched_predict(model, x_adv)
    robust = correct & (adv == y)
    broken = (correct & ~robust).cpu()
    out = _outcome(clean, correct, robust, n, fooled=(adv != clean).cpu(),
                   forwards=torch.ones(n, dtype=torch.long))
    for i, p in enumerate(adv.cpu().tolist()):
        out.adv_pred[i] = p
        out.attack_preds[i][name] = p
        if broken[i]:
            out.broken_by[i] = name
    out.costs.append({"seconds": time.perf_counter() - t0, "gradients": 0, "forwards": n})
    return out


def evaluate_universal(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    generator: torch.Generator | None = None,
) -> StructuredResult:
    """Fit ``attack``'s universal perturbation on (fit_x, fit_y), apply it to (x, y)."""
    delta, fit = fit_universal(model, attack, fit_x, fit_y, generator)
    out = universal_batch(model, attack.threat, delta, x, y, attack.name)
    return StructuredResult(
        attack.threat.to_dict(), len(y), float(out.correct.float().mean()),
        {"universal": float(out.robust.float().mean())}, out.robust,
        {"attack": attack.config(), "fooling_rate": float(out.fooled.float().mean()),
         "fit_images": fit["n"], "fit_fooled": fit["fooled"], "delta_norm": fit["norm"]},
    )


# ---------------------------------------------------------------------- patch


def fit_patch(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``attack``'s patch (C, s, s) fitted on (fit_x, fit_y), and a record of the fit."""
    _check_attack(attack, PatchThreat)
    t0 = time.perf_counter()
    with eval_mode(model):
        patch, grads, _ = attack.fit(model, fit_x, fit_y, generator)
    return patch, {"n": len(fit_y), "gradients": int(grads.sum()), "seconds": round(time.perf_counter() - t0, 3)}


def patch_batch(
    model: nn.Module, attack: Attack, patch: torch.Tensor, x: torch.Tensor, y: torch.Tensor, draws: int = 10,
    generator: torch.Generator | None = None, status: Callable[[str, int], None] | None = None,
) -> BatchOutcome:
    """``patch`` on every image at ``draws`` random positions (``random_correct``: how many left it
    correct) and, on the correctly classified ones, at the worst position of ``attack``'s grid (its
    ``stride``): robust when no position fools it."""
    _check_attack(attack, PatchThreat)
    if draws < 1:
        raise RobustlabError(f"draws must be >= 1, got {draws}")
    threat = attack.threat
    _, _, h, w = x.shape
    patch = patch.to(x.device, x.dtype)
    with eval_mode(model):
        clean, correct, n = _start(model, x, y)
        out = _outcome(clean, correct, correct.clone(), n, position=torch.full((n, 2), -1, dtype=torch.long),
                       random_correct=torch.zeros(n, dtype=torch.long))
        t0 = time.perf_counter()
        if status:
            status(RANDOM_POSITION, n)
        for d in range(draws):
            top, left = threat.random_locations(n, h, w, generator, device="cpu")
            x_adv = threat.apply(x, patch, top.to(x.device), left.to(x.device))
            if not bool(threat.contains(x_adv, x).all()):
                raise RobustlabError("internal error: a placed patch left its threat model")
            pred = _batched_predict(model, x_adv)
            out.random_correct += (correct & (pred == y)).long().cpu()
            if d == 0:
                for i, p in enumerate(pred.cpu().tolist()):
                    out.attack_preds[i][RANDOM_POSITION] = p
        out.forwards += draws
        out.costs.append({"seconds": time.perf_counter() - t0, "gradients": 0, "forwards": n * draws})
        t0 = time.perf_counter()
        worst = attack.rebuild(**{**attack.params, "locations": "worst"})
        idx = correct.nonzero(as_tuple=True)[0].cpu()
        spent = 0
        if idx.numel():
            if status:
                status(WORST_POSITION, int(idx.numel()))
            dev = idx.to(x.device)
            res = worst.place(model, x[dev], y[dev], patch)
            pred = _batched_predict(model, res.x_adv)
            ok = res.success & threat.contains(res.x_adv, x[dev]) & (pred != y[dev])
            out.rejected += int((res.success & ~ok).sum())
            pred, ok, where = pred.cpu(), ok.cpu(), res.params.cpu()
            for j, i in enumerate(idx.tolist()):
                out.attack_preds[i][WORST_POSITION] = out.adv_pred[i] = int(pred[j])
                if ok[j]:
                    out.broken_by[i] = WORST_POSITION
                    out.position[i] = where[j]
            out.robust[idx[ok]] = False
            out.forwards[idx] += res.forwards.cpu() + 1
            spent = int(res.forwards.sum()) + int(idx.numel())
        out.costs.append({"seconds": time.perf_counter() - t0, "gradients": 0, "forwards": spent})
    return out


def evaluate_patch(
    model: nn.Module, attack: Attack, fit_x: torch.Tensor, fit_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    draws: int = 10, generator: torch.Generator | None = None, eval_generator: torch.Generator | None = None,
) -> StructuredResult:
    """Fit ``attack``'s patch on (fit_x, fit_y) with ``generator``; on (x, y): accuracy at ``draws``
    random positions per image (the mean; drawn from ``eval_generator``, by default the same
    generator after the fit) and at the worst position of the attack's grid (its ``stride``)."""
    if draws < 1:
        raise RobustlabError(f"draws must be >= 1, got {draws}")
    patch, fit = fit_patch(model, attack, fit_x, fit_y, generator)
    out = patch_batch(model, attack, patch, x, y, draws, eval_generator if eval_generator is not None else generator)
    return StructuredResult(
        attack.threat.to_dict(), len(y), float(out.correct.float().mean()),
        {"random position": float(out.random_correct.sum()) / (draws * len(y)),
         "worst position": float(out.robust.float().mean())}, out.robust,
        {"attack": attack.config(), "draws": draws, "fit_images": fit["n"]},
    )
