"""Score-based attacks that estimate the gradient from output scores by finite differences.

The shared loop (:class:`ScoreBasedAttack`) keeps a current point per sample; every step it queries
the model once per image at the current point and at ``2 * samples`` points around it (antithetic
pairs ``x + spread * v`` and ``x - spread * v``, clipped to the box), as one batch over (active
samples x queries) (fed to the model in calls of a size that suits the device), turns the score differences into a gradient estimate, and lets the
subclass take a step. A sample whose current point is already misclassified (read off the same
forward call) keeps that point and is dropped at once. Per-sample query counts are exact: every
image sent to the model is one query of the sample it belongs to; no input gradient is ever taken.

- SPSA (Uesato et al. 2018, "Adversarial risk and the dangers of evaluating against weak attacks"):
  Rademacher directions, Adam on the estimated gradient of the margin loss.
- NES (Ilyas et al. 2018, "Black-box adversarial attacks with limited queries and information"):
  antithetic Gaussian directions, PGD-style steepest-ascent steps (see :mod:`robustlab.attacks.nes`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import Attack, AttackResult, register_attack
from robustlab.errors import RobustlabError
from robustlab.losses import LOSSES, get_loss

#: Largest number of query pixels (images x pixels) built at once, to bound memory.
MAX_QUERY_ELEMENTS = 1 << 24
#: Largest number of input pixels per model call on CPU. Measured with one thread: per image, the
#: digits, MNIST and CIFAR-10 reference CNNs run 1.3-1.7x faster in calls of about this size (2048,
#: 167 and 42 images) than in calls of thousands of images. On other devices calls are as large as
#: MAX_QUERY_ELEMENTS allows.
CPU_CALL_ELEMENTS = 1 << 17


def query_logits(attack: Attack, model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on a batch of query points (no gradient), in calls of a size that suits
    the device (see ``CPU_CALL_ELEMENTS``)."""
    cap = CPU_CALL_ELEMENTS if points.device.type == "cpu" else MAX_QUERY_ELEMENTS
    rows = max(1, cap // max(1, points[0].numel()))
    if points.shape[0] <= rows:
        return attack.logits(model, points)
    return torch.cat([attack.logits(model, points[i : i + rows]) for i in range(0, points.shape[0], rows)])


class ScoreBasedAttack(Attack):
    """Base of the finite-difference attacks. Subclasses set ``gaussian`` (the direction
    distribution), ``spread()`` (the finite-difference radius, pixels) and implement ``_step``."""

    kind = "score-based"
    gaussian = False

    def validate(self) -> None:
        super().validate()
        if self.params["samples"] < 1:
            raise RobustlabError(f"attack {self.name!r}: samples must be >= 1, got {self.params['samples']}")

    def spread(self) -> float:
        raise NotImplementedError

    def _init_state(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample optimizer state (tensors with the samples along dim 0)."""
        return {}

    def _step(
        self, x_cur: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], t: int
    ) -> torch.Tensor:
        """The next point (inside the threat model) from the gradient estimate at ``x_cur``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ estimation

    def estimate_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at ``x``, estimated input gradient of the loss at ``x``), from ``2 * samples + 1``
        queries per sample: ``x`` itself and ``samples`` antithetic pairs.

        grad = mean_i [f(x + c v_i) - f(x - c v_i)] v_i / (2 c), with c = ``spread()`` and v_i
        Rademacher (SPSA) or standard Gaussian (NES); the query points are clipped to the box.
        """
        s, c = self.params["samples"], self.spread()
        loss = get_loss(self.params["loss"])
        m, shape = x.shape[0], x.shape[1:]
        per_sample = (2 * s + 1) * math.prod(shape)
        rows = max(1, MAX_QUERY_ELEMENTS // per_sample)
        center_logits, grads = [], []
        for lo in range(0, m, rows):
            xb, yb = x[lo : lo + rows], y[lo : lo + rows]
            k = xb.shape[0]
            kw = dict(device=x.device, generator=generator)
            if self.gaussian:
                v = torch.randn((k, s, *shape), dtype=x.dtype, **kw)
            else:
                v = torch.randint(0, 2, (k, s, *shape), **kw).to(x.dtype).mul_(2).sub_(1)
            lower, upper = self.threat.lower, self.threat.upper
            plus = (xb.unsqueeze(1) + c * v).clamp_(lower, upper)
            minus = (xb.unsqueeze(1) - c * v).clamp_(lower, upper)
            queries = torch.cat([xb.unsqueeze(1), plus, minus], dim=1).flatten(0, 1)
            del plus, minus
            logits = query_logits(self, model, queries).view(k, 2 * s + 1, -1)
            scores = loss(logits[:, 1:].flatten(0, 1), yb.repeat_interleave(2 * s), self.targeted).view(k, 2 * s)
            diff = (scores[:, :s] - scores[:, s:]).view(k, s, *[1] * len(shape))
            grads.append((diff * v).mean(dim=1) / (2 * c))
            center_logits.append(logits[:, 0])
        return torch.cat(center_logits), torch.cat(grads)

    # ------------------------------------------------------------------ the loop

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        p = self.params
        found = Active(x)
        per_step = 2 * p["samples"] + 1
        x0, y0 = x, y
        x_cur = self.threat.random_init(x, generator, radius="uniform") if p["random_start"] else x.clone()
        state = self._init_state(x0)
        for t in range(p["steps"]):
            logits, grad = self.estimate_gradient(model, x_cur, y0, generator)
            found.spend(forwards=per_step)
            if found.retire(self.is_success(logits, y0), x_cur):
                x0, y0, x_cur, grad, state = found.kept(x0, y0, x_cur, grad, state)
                if not found:
                    break
            x_cur = self._step(x_cur, x0, grad, state, t)
        if found:
            # The last point has not been looked at yet: one query each.
            done = self.is_success(self.logits(model, x_cur), y0)
            found.spend(forwards=1)
            found.close(x_cur, success=done)
        return found.result()


@register_attack
class SPSA(ScoreBasedAttack):
    """SPSA with Adam (Uesato et al. 2018), score-based.

    steps: iterations; samples: antithetic pairs per step (each step costs ``2 * samples + 1``
    queries per sample: the pairs and the current point); delta: finite-difference radius (pixels);
    lr: Adam learning rate (pixels per step, roughly); beta1/beta2: Adam moment decays; loss: the
    maximized objective (``cw`` margin by default, as in the paper); random_start: start at a random
    point of the ball instead of the clean image. Linf (the paper's setting) and L2: the Adam step is
    taken on the perturbation and projected back onto the threat model.
    """

    name = "spsa"
    norms = ("linf", "l2")
    defaults = {
        "steps": 100, "samples": 128, "lr": 0.01, "delta": 0.01, "beta1": 0.9, "beta2": 0.999,
        "loss": "cw", "random_start": False,
    }
    choices = {"loss": tuple(LOSSES)}

    def validate(self) -> None:
        super().validate()
        p = self.params
        for key in ("lr", "delta"):
            if not p[key] > 0:
                raise RobustlabError(f"attack {self.name!r}: {key} must be > 0, got {p[key]}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= p[key] < 1.0:
                raise RobustlabError(f"attack {self.name!r}: {key} must be in [0, 1), got {p[key]}")

    def spread(self) -> float:
        return float(self.params["delta"])

    def _init_state(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"m": torch.zeros_like(x0), "v": torch.zeros_like(x0)}

    def _step(self, x_cur, x0, grad, state, t):
        p = self.params
        b1, b2 = p["beta1"], p["beta2"]
        state["m"].mul_(b1).add_(grad, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = state["m"] / (1 - b1 ** (t + 1))
        v_hat = state["v"] / (1 - b2 ** (t + 1))
        # Ascent on the loss (Adam minimizes, so the sign is flipped).
        return self.threat.project(x_cur + p["lr"] * m_hat / (v_hat.sqrt() + 1e-8), x0)
