"""The binarization test (Zimmermann et al. 2022, "Increasing Confidence in Adversarial Robustness
Evaluations"): can the attack find a decision boundary that is known to be reachable?

For each test point x, the model's last linear layer is replaced by a binary readout on the same
features, built so that x and points near it are class 0 while one point x_b on the surface of the
eps-ball is class 1. An adversarial example for the binarized model therefore exists inside the
ball (x_b itself). An attack that fails to find one is too weak for this model, and robust accuracy
measured with it overestimates robustness.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from robustlab.attacks.base import Attack
from robustlab.eval.sanity import verdict
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel, norms

INNER_POINTS = 32


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The model's final linear layer (the readout), or None."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class Binarized(nn.Module):
    """``model`` with its readout replaced by ``[0, w . features + b]`` (class 1 = adversarial)."""

    def __init__(self, model: nn.Module, readout: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.model, self.readout = model, readout
        self.register_buffer("w", w)
        self.register_buffer("b", b)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.readout.register_forward_pre_hook(lambda mod, inp: captured.append(inp[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.features(x) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def surface_point(threat: ThreatModel, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A point of the box at (close to) distance eps from x, in a random direction."""
    delta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if threat.norm == "linf":
        delta = delta.sign() * threat.eps
    else:
        delta = delta * threat.eps / norms(delta, threat.norm).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return threat.project(x + delta, x)


def binarization_test(
    model: nn.Module, attack: Attack, x: torch.Tensor, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Run ``attack`` against a binarized copy of ``model`` around each point of ``x``.

    Returns a verdict with the number of valid test cases (where the construction succeeded) and how
    many of them the attack solved; pass needs at least 90% solved.
    """
    readout = last_linear(model)
    if readout is None:
        return verdict("binarization", "warn", "not run: the model has no final linear layer to binarize")
    threat = attack.threat
    valid = solved = 0
    with eval_mode(model):
        for i in range(x.shape[0]):
            x0 = x[i : i + 1]
            inner = threat.with_eps(0.5 * threat.eps).random_init(x0.expand(INNER_POINTS, *x0.shape[1:]), generator)
            inner = torch.cat([x0, inner])
            x_b = surface_point(threat, x0, generator)
            probe = Binarized(model, readout, torch.zeros(1), torch.zeros(1))
            with torch.no_grad():
                f_in, f_b = probe.features(inner), probe.features(x_b)
            w = (f_b[0] - f_in.mean(dim=0)).detach()
            s_in, s_b = f_in @ w, (f_b @ w)[0]
            if not bool(s_b > s_in.max()):
                continue  # the features cannot separate x_b from x's neighbourhood: no valid test case
            b = -(s_in.max() + s_b) / 2
            binary = Binarized(model, readout, w, b.reshape(1))
            valid += 1
            res = attack.run(binary, x0, torch.zeros(1, dtype=torch.long, device=x.device), generator=generator)
            with torch.no_grad():
                adversarial = binary(res.x_adv).argmax(dim=1) == 1
            solved += int(bool(adversarial[0]) and bool(threat.contains(res.x_adv, x0)[0]))
    if valid == 0:
        return verdict("binarization", "warn", "not run: no valid test case could be built from the model's features")
    detail = f"{attack.name} found the reachable boundary in {solved} of {valid} binarized test cases"
    if solved >= 0.9 * valid:
        return verdict("binarization", "pass", detail)
    status = "warn" if solved >= 0.5 * valid else "fail"
    return verdict("binarization", status, detail + ": the attack is too weak for this model; robust accuracy is "
                   "overestimated")
