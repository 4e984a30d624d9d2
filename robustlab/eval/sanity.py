"""Checks that catch gradient masking and misleading models, run with every evaluation.

Each check returns a verdict ``{"name", "status": "pass" | "warn" | "fail", "detail"}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.checks import check_logits
from robustlab.models.runtime import eval_mode, training_modules
from robustlab.threat import ThreatModel


def verdict(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}


def large_eps(threat: ThreatModel, image_dim: int) -> float:
    """A radius whose ball covers the whole box: every image is reachable."""
    width = threat.upper - threat.lower
    return {"linf": width, "l2": width * math.sqrt(image_dim), "l1": width * image_dim}[threat.norm]


def inspect_model(model: nn.Module, x: torch.Tensor, dense: bool = False) -> dict[str, Any]:
    """Facts about a model that change how its numbers must be read: which submodules were in train
    mode (they are evaluated in eval mode), and whether its outputs depend on random draws.

    ``randomized``: its predictions do (two identical calls of the forward pass differ and the model
    does not declare that only the attacker's view is random, or two predictions with different
    generators disagree). ``attack_randomized``: only the attacker's view draws random numbers (a
    defense that declares ``attack_randomized``, e.g. sampled gradients for k-WTA) while the
    predictions are deterministic."""
    from robustlab.predictor import predict

    forced = training_modules(model)
    with eval_mode(model), torch.no_grad():
        a = check_logits(model(x), x.shape[0], dense=dense)
        b = model(x)
        scale = float(a.abs().max()) + 1e-12
        differs = not torch.isfinite(a).all() or float((a - b).abs().max()) > 1e-5 * scale
        declared = [d.name for d in getattr(model, "defenses", []) if getattr(d, "attack_randomized", False)]
        attack_only = bool(differs and declared and not getattr(model, "randomized", False))
        if attack_only:  # the attacker's view is random by declaration: are the predictions deterministic?
            gens = [torch.Generator(device=x.device).manual_seed(s) for s in (1, 2)]
            attack_only = torch.equal(predict(model, x, gens[0]), predict(model, x, gens[1]))
    out = {"eval_mode_forced": forced, "randomized": bool(differs and not attack_only)}
    if attack_only:
        out["attack_randomized"] = declared
    return out


def mode_verdicts(info: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    forced = info.get("eval_mode_forced") or []
    if forced:
        shown = ", ".join(forced[:5]) + (f" and {len(forced) - 5} more" if len(forced) > 5 else "")
        out.append(verdict("eval-mode", "warn", f"{len(forced)} dropout/batch-norm modules were in train mode "
                           f"({shown}); the model was evaluated in eval mode"))
    else:
        out.append(verdict("eval-mode", "pass", "the model was already in eval mode"))
    if info.get("randomized"):
        out.append(verdict("randomized", "warn", "two identical calls gave different outputs: the model or defense "
                           "is randomized, so these numbers need an adaptive evaluation with EOT"))
    elif info.get("attack_randomized"):
        out.append(verdict("randomized", "pass", "predictions are deterministic (two predictions with different "
                           "random draws gave the same labels); only the attacker's view draws random numbers, as "
                           f"declared by {', '.join(info['attack_randomized'])} (gradients averaged over draws)"))
    else:
        out.append(verdict("randomized", "pass", "two identical calls gave the same output"))
    return out


def gradient_verdict(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """Input gradients of the cross-entropy on correctly classified points: zero or non-finite
    gradients mean gradient-based attacks cannot work, and their numbers would be meaningless."""
    with eval_mode(model), torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = check_logits(model(x), x.shape[0])
        keep = logits.argmax(dim=1) == y
        if not bool(keep.any()):
            return verdict("gradients", "warn", "no correctly classified point to check gradients on")
        loss = F.cross_entropy(logits[keep], y[keep], reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    g = grad[keep].flatten(1)
    n = g.shape[0]
    nonfinite = int((~torch.isfinite(g)).any(dim=1).sum())
    zero = int((g == 0).all(dim=1).sum())
    detail = f"{zero} of {n} points have an all-zero input gradient, {nonfinite} a non-finite one"
    if nonfinite or zero > n // 2:
        return verdict("gradients", "fail", detail + ": gradient masking, use BPDA/EOT or a black-box attack")
    if zero:
        return verdict("gradients", "warn", detail)
    return verdict("gradients", "pass", detail)


def large_eps_verdict(robust: int, attacked_n: int, eps: float) -> dict[str, str]:
    """Accuracy inside a ball that covers the whole box must be ~0, else the attack is failing."""
    detail = f"robust accuracy {robust}/{attacked_n} at eps={eps:g} (every image is reachable)"
    if robust <= max(1, attacked_n // 100):
        return verdict("large-eps", "pass", detail)
    if robust <= max(2, attacked_n // 10):
        return verdict("large-eps", "warn", detail + ": should be ~0")
    return verdict("large-eps", "fail", detail + ": the attack fails where it cannot fail; suspect gradient masking")


def steps_verdict(points: list[dict[str, float]], n: int) -> dict[str, str]:
    """More iterations must not raise robust accuracy beyond the noise of random starts (two samples
    or one point, whichever is larger); gradient masking typically shows far larger rises."""
    if len(points) < 2:
        return verdict("more-steps", "warn", "fewer than two steps-curve points; not checked")
    tol = max(2.0 / max(n, 1), 0.01) + 1e-12
    worst = None
    for a, b in zip(points, points[1:]):
        rise = b["robust_accuracy"] - a["robust_accuracy"]
        if rise > tol and (worst is None or rise > worst[0]):
            worst = (rise, a, b)
    curve = ", ".join(f"{p['steps']}: {100 * p['robust_accuracy']:.2f}%" for p in points)
    if worst:
        rise, a, b = worst
        return verdict("more-steps", "fail", f"robust accuracy rose by {100 * rise:.2f} points from {a['steps']} to "
                       f"{b['steps']} steps ({curve}): suspect gradient masking or a broken attack")
    return verdict("more-steps", "pass", f"robust accuracy does not rise with steps ({curve})")
