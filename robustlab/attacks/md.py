"""The Margin-Decomposition (MD) attack and its multi-targeted variant MD-MT (Ma et al., "Imbalanced
Gradients: A Subtle Cause of Overestimated Adversarial Robustness"), in Linf and L2.

Why: the margin loss ``z_o - z_y`` (``z_y`` the true-class logit, ``z_o`` the largest other logit, or a
target's) is a sum of two terms. When the gradient of one term dominates the other ("imbalanced
gradients", which some defenses produce), PGD on the margin follows the dominant term only and stalls;
robustness is overestimated. MD first maximizes *one term alone*, then the full margin.

What is implemented (per restart, from a random start in the ball):

- stage 1, the first ``switch * steps`` iterations: maximize one decomposed term, alternating across
  restarts: even restarts ``-z_y`` (push the true class down), odd restarts ``z_o`` (push the best other
  class up; MD-MT: the target class);
- stage 2, the remaining iterations: maximize the margin ``z_o - z_y`` (MD-MT: ``z_t - z_y``);
- steps along the norm's steepest-ascent direction (sign for Linf, normalized gradient for L2) with a
  cosine-annealed step size that starts at ``2 * eps`` (APGD's initial step) and decays towards 0 within
  each stage, restarting at the switch; every iterate is projected onto the threat model.

MD-MT repeats this for each of the ``n_target_classes`` classes with the highest clean logits after
the true one, each only on the samples still robust (targets ranked once, on the clean images).

Assumptions and departures from the authors' release (their code is the reference; the paper describes
the idea): its very first iteration ascends ``z_y`` (which looks like an artefact) -- left out here;
its stage-1 cosine phase runs over the stage-2 length -- here each stage anneals over its own length;
defaults follow it (50 steps switching at 25, restarts in pairs, one pair per start); its multi-targeted
loop visits target ranks in an order that includes the true class -- here exactly the top
``n_target_classes`` other classes. ODI initialization and the DLR variant (MDE) are not implemented.

As everywhere in robustlab, a sample leaves the batch at the first iterate the model misclassifies and
that iterate is returned; later restarts and targets only attack the samples still robust. Unbroken
samples return the point with the largest margin ``max_{j != y} z_j - z_y`` seen.

Costs per sample, exactly: ``steps`` gradients and ``steps + 1`` forwards (the last iterate is only
evaluated) per restart (and per target, MD-MT) on a sample that is never broken; MD-MT spends one more
forward on the clean image, to rank the targets.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.apgd import INITIAL_STEP
from robustlab.attacks.base import Attack, AttackResult, eot_gradient, register_attack
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.losses import cw_margin

# (logits, true labels, target labels or None) -> per-sample value to maximize
Term = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _true_and_other(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_y`` and ``z_t`` (a target given) or ``max_{j != y} z_j`` (none given), per sample."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    if t is not None:
        return true, logits.gather(1, t[:, None]).squeeze(1)
    return true, logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)


def true_term(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 term of even restarts: ``-z_y``."""
    return -logits.gather(1, y[:, None]).squeeze(1)


def other_term(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-1 term of odd restarts: ``z_t`` (MD-MT) or ``max_{j != y} z_j`` (MD)."""
    return _true_and_other(logits, y, t)[1]


def margin(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Stage-2 objective: ``z_t - z_y`` (MD-MT) or ``max_{j != y} z_j - z_y`` (MD)."""
    true, other = _true_and_other(logits, y, t)
    return other - true


def cosine_step(i: int, steps: int, switch: int, initial: float) -> float:
    """The step size of iteration ``i`` (0-based): within each stage (``[0, switch)`` and
    ``[switch, steps)``) it anneals from ``initial`` along half a cosine period, ``initial * (1 +
    cos(pi * j / length)) / 2`` at the stage's ``j``-th iteration, never reaching 0."""
    if i < switch:
        j, length = i, switch
    else:
        j, length = i - switch, steps - switch
    return initial * 0.5 * (1.0 + math.cos(math.pi * j / length))


class _MarginDecomposition(Attack):
    """The MD loop shared by ``md`` and ``md-mt``.

    steps: iterations per restart; switch: the fraction of them spent on the decomposed term (stage 1)
    before the full margin (stage 2); restarts: runs from new random starts, each only on samples not
    yet broken, alternating the stage-1 term (``-z_y``, then the other logit).
    """

    defaults = {"steps": 50, "restarts": 2, "switch": 0.5}
    norms = ("linf", "l2")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.params["switch"] < 1.0:
            raise RobustlabError(f"attack {self.name!r}: switch must be in [0, 1), got {self.params['switch']}")
        if self.targeted:
            raise RobustlabError(
                f"attack {self.name!r} is untargeted (it takes the true labels): use targeted=False"
            )

    def switch_step(self) -> int:
        """The first iteration of stage 2: ``floor(switch * steps)``, robust to rounding (0.29 * 100 is
        29, not 28.999...)."""
        return math.floor(self.params["switch"] * self.params["steps"] + 1e-9)

    def _evaluate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, term: Term | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (detached) and the input gradient of ``term`` (None: a forward pass only). Only the
        input gets a gradient."""
        if term is None:
            return self.logits(model, x), None
        logits, _, g = eot_gradient(lambda z: check_logits(model(z), x.shape[0]), lambda out: term(out, y, t), x)
        return logits, g

    def _run(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y0: torch.Tensor,
        t0: torch.Tensor | None,
        first: Term,
        generator: torch.Generator | None,
    ) -> Active:
        """One run of ``steps`` iterations from a random start: ``first`` in stage 1, the margin in
        stage 2. Returns per sample the point (first misclassified iterate, else the largest-margin
        one), success, gradients and forwards spent, and the best margin (the attack's bookkeeping)."""
        threat, steps = self.threat, self.params["steps"]
        switch = self.switch_step()
        initial = INITIAL_STEP * threat.eps
        m, dev = x0.shape[0], x0.device
        run = Active(x0)
        x_cur = threat.random_init(x0, generator, radius="uniform")
        x_best, v_best = x_cur, torch.full((m,), -math.inf, device=dev)
        for i in range(steps + 1):
            last = i == steps
            term = None if last else (first if i < switch else margin)
            logits, g = self._evaluate(model, x_cur, y0, t0, term)
            run.spend(gradients=0 if last else 1, forwards=1)
            value = cw_margin(logits, y0)
            better = value > v_best
            v_best = torch.where(better, value, v_best)
            x_best = torch.where(better.view(-1, *[1] * (x0.dim() - 1)), x_cur, x_best)
            if run.retire(self.is_success(logits, y0), x_cur, value):
                if not run:
                    return run
                x0, y0, x_cur, x_best, v_best, t0, g = run.kept(x0, y0, x_cur, x_best, v_best, t0, g)
            if last:
                break
            step = threat.steepest_step(g, cosine_step(i, steps, switch, initial))
            x_cur = threat.project(x_cur + step, x0)
        run.close(x_best, value=v_best)
        return run

    def _runs(self, model, x, y, t, found: Active, generator) -> bool:
        """All restarts (one target, or none), each on the samples still robust. False: none left."""
        for r in range(self.params["restarts"]):
            idx = found.unbroken()
            if idx.numel() == 0:
                return False
            first = true_term if r % 2 == 0 else other_term
            found.merge(idx, self._run(model, x[idx], y[idx], None if t is None else t[idx], first, generator))
        return True


@register_attack
class MD(_MarginDecomposition):
    """Margin-decomposition attack: per restart, ``switch * steps`` iterations on one term of the margin
    (``-z_y`` on even restarts, the largest other logit on odd ones), then the margin itself; cosine
    step size from ``2 * eps``. Defaults as released: 50 steps switching at 25, 2 restarts (one pair)."""

    name = "md"

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        found = Active(x)
        if self.threat.eps == 0:  # nothing to search: one evaluation of the clean images
            logits, _ = self._evaluate(model, x, y, None, None)
            found.forwards += 1
            found.success = self.is_success(logits, y)
            return found.result()
        self._runs(model, x, y, None, found, generator)
        return found.result()


@register_attack
class MDMT(_MarginDecomposition):
    """Multi-targeted MD: the MD schedule on ``z_t - z_y`` for each of the ``n_target_classes``
    classes with the highest clean logits after the true one, each only on the samples still robust.
    Stage 1 alternates ``-z_y`` and ``z_t``."""

    name = "md-mt"
    defaults = {**_MarginDecomposition.defaults, "n_target_classes": 9}

    def validate(self) -> None:
        super().validate()
        if self.params["n_target_classes"] < 1:
            got = self.params["n_target_classes"]
            raise RobustlabError(f"attack 'md-mt': n_target_classes must be >= 1, got {got}")

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        found = Active(x)
        # Rank the classes on the clean images (this also finds the already misclassified samples).
        logits, _ = self._evaluate(model, x, y, None, None)
        found.forwards += 1
        found.success = self.is_success(logits, y)
        if logits.shape[1] < 2:
            raise RobustlabError("attack 'md-mt' needs at least 2 classes")
        if self.threat.eps == 0:
            return found.result()
        ranked = logits.argsort(dim=1, descending=True)
        for rank in range(1, min(self.params["n_target_classes"], logits.shape[1] - 1) + 1):
            if not self._runs(model, x, y, ranked[:, rank], found, generator):
                break
        return found.result()
