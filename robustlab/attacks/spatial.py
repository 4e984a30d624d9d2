"""Spatial attacks (Engstrom, Tran, Tsipras, Schmidt & Madry 2019, "Exploring the landscape of
spatial robustness"): the worst rotation and translation of each image within a
:class:`robustlab.threat_kinds.SpatialThreat`.

- ``spatial-grid``: exhaustive search over a grid of ``angles`` rotations and ``shifts`` x ``shifts``
  translations spanning the set (the paper's strongest attack). Grid points are tried in order of
  their size (the identity first), in calls of many images; a sample stops at the first that the
  model misclassifies (the smallest such transformation on the grid); an unbroken sample ends at the
  grid point of highest cross-entropy.
- ``spatial-fo``: first-order, projected gradient ascent of the cross-entropy on the three
  parameters (angle, dx, dy) through the bilinear resampling, from a uniformly random start, with
  steps of ``step_fraction`` of each parameter's range; a sample stops at its first misclassified
  iterate.

Both return, in ``AttackResult.params``, each sample's (angle in degrees, dx, dy in pixels); the
evaluation re-renders the image from them to verify it (:meth:`SpatialThreat.verify`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.attacks.spsa import CPU_CALL_ELEMENTS, MAX_QUERY_ELEMENTS
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError


def spatial_grid(max_angle: float, max_shift: float, angles: int, shifts: int) -> torch.Tensor:
    """(K, 3) grid of (angle, dx, dy), ordered by size (the sum of each |parameter| over its bound),
    the identity first when the grid holds it."""
    a = torch.linspace(-max_angle, max_angle, angles) if angles > 1 else torch.zeros(1)
    s = torch.linspace(-max_shift, max_shift, shifts) if shifts > 1 else torch.zeros(1)
    grid = torch.cartesian_prod(a, s, s).view(-1, 3)
    scale = torch.tensor([max(max_angle, 1e-12), max(max_shift, 1e-12), max(max_shift, 1e-12)])
    size = (grid.abs() / scale).sum(dim=1)
    return grid[torch.sort(size, stable=True).indices]


class _SpatialAttack(Attack):
    norms = ("spatial",)

    def _params_out(self, n: int, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, 3, dtype=x.dtype, device=x.device)


@register_attack
class SpatialGrid(_SpatialAttack):
    """Grid search over rotations and translations.

    angles: rotations on the grid (from -max_angle to max_angle); shifts: translations per axis.
    """

    name = "spatial-grid"
    defaults = {"angles": 31, "shifts": 5}

    def validate(self) -> None:
        super().validate()
        for key in ("angles", "shifts"):
            if self.params[key] < 1:
                raise RobustlabError(f"attack {self.name!r}: {key} must be >= 1, got {self.params[key]}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        t = self.threat
        grid = spatial_grid(t.max_angle, t.max_shift, self.params["angles"], self.params["shifts"]).to(x.device, x.dtype)
        n = x.shape[0]
        cap = CPU_CALL_ELEMENTS if x.device.type == "cpu" else MAX_QUERY_ELEMENTS
        per_call = max(1, cap // x[0].numel())
        params = self._params_out(n, x)
        best_loss = torch.full((n,), -float("inf"), dtype=x.dtype, device=x.device)
        found = Active(x)
        live_x, live_y = x, y
        k_chunk = max(1, per_call // max(1, n))
        with torch.no_grad():
            for k0 in range(0, grid.shape[0], k_chunk):
                m = len(found)
                if m == 0:
                    break
                g = grid[k0 : k0 + k_chunk]
                k = g.shape[0]
                xs = live_x.unsqueeze(1).expand(m, k, *x.shape[1:]).reshape(m * k, *x.shape[1:])
                ps = g.unsqueeze(0).expand(m, k, 3).reshape(m * k, 3)
                cand = t.apply(xs, ps)
                logits = check_logits(model(cand), m * k).view(m, k, -1)
                yk = live_y.view(m, 1).expand(m, k)
                loss = F.cross_entropy(logits.flatten(0, 1), yk.reshape(-1), reduction="none").view(m, k)
                if self.targeted:
                    loss = -loss
                hit = self.is_success(logits.flatten(0, 1), yk.reshape(-1)).view(m, k)
                found.forwards[found.pos] += k  # every image of the chunk was queried
                top = loss.argmax(dim=1)
                better = loss.gather(1, top.view(-1, 1)).squeeze(1) > best_loss[found.pos]
                rows = found.pos[better]
                best_loss[rows] = loss[better, top[better]]
                params[rows] = g[top[better]]
                found.x_adv[rows] = cand.view(m, k, *x.shape[1:])[better, top[better]]
                done = hit.any(dim=1)
                if bool(done.any()):
                    pick = hit.float().argmax(dim=1)
                    params[found.pos[done]] = g[pick[done]]
                    chosen = cand.view(m, k, *x.shape[1:])[torch.arange(m, device=x.device), pick]
                    found.retire(done, chosen)
                    live_x, live_y = found.kept(live_x, live_y)
        result = found.result()
        result.params = params
        return result


@register_attack
class SpatialFirstOrder(_SpatialAttack):
    """Projected gradient ascent on (angle, dx, dy).

    steps: gradient steps; step_fraction: step per parameter as a fraction of its range
    (2 * bound); restarts: runs from new random starts on the samples not broken yet.
    """

    name = "spatial-fo"
    defaults = {"steps": 20, "step_fraction": 0.1, "restarts": 1}

    def validate(self) -> None:
        super().validate()
        if not self.params["step_fraction"] > 0:
            raise RobustlabError(f"attack {self.name!r}: step_fraction must be > 0, got {self.params['step_fraction']}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        t = self.threat
        n = x.shape[0]
        bound = t.bounds.to(x.device, x.dtype)
        step = 2 * bound * self.params["step_fraction"]
        params = self._params_out(n, x)
        found = Active(x)
        for _ in range(self.params["restarts"]):
            if not found.restart():
                break
            x0, y0 = x[found.pos], y[found.pos]
            u = torch.rand(len(found), 3, generator=generator, device=x.device, dtype=x.dtype)
            theta = (u * 2 - 1) * bound
            for i in range(self.params["steps"] + 1):
                last = i == self.params["steps"]
                theta_req = theta.detach().requires_grad_(not last)
                with torch.enable_grad() if not last else torch.no_grad():
                    cand = t.apply(x0, theta_req)
                    logits = check_logits(model(cand), x0.shape[0])
                    if not last:
                        loss = F.cross_entropy(logits, y0, reduction="sum")
                        (g,) = torch.autograd.grad(-loss if self.targeted else loss, theta_req)
                found.spend(gradients=0 if last else 1, forwards=1)
                done = self.is_success(logits.detach(), y0)
                if bool(done.any()):
                    params[found.pos[done]] = theta[done]
                    found.retire(done, cand.detach())
                    x0, y0, theta, cand, g = found.kept(x0, y0, theta, cand, None if last else g)
                    if not found:
                        break
                if last:
                    break
                theta = t.clamp(theta + step * g.sign())
            if found:
                params[found.pos] = theta
                found.close(cand.detach())
        result = found.result()
        result.params = params
        return result
