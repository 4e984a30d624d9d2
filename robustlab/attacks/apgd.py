"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): APGD-CE, APGD-DLR and the targeted-DLR APGD-T of AutoAttack, in
Linf, L2 and L1.

APGD is PGD with momentum whose step size needs no tuning: it starts at ``2 * eps`` and is halved at
fixed checkpoints (``checkpoints``) whenever the loss stalled since the previous one, in which case the
run also jumps back to its best point. In L1 (Croce & Hein 2021, "Mind the box: l1-APGD for sparse
adversarial attacks on image classifiers") the steps are sparse: they move the coordinates with the
largest gradient that the box lets move, a fraction that follows the sparsity of the best point found,
with a step size that shrinks unless the best point got sparser (checked every 4% of the
iterations, ``l1_checkpoints``); no momentum.

Each sample keeps its best-loss point; as soon as a sample is misclassified its first successful
iterate is kept and the sample leaves the batch, so no compute is spent on it afterwards (restarts and
target classes only re-attack the survivors). With ``eot`` > 1 (a randomized model) success is judged
on the logits averaged over the draws, which a fresh vote of the model may not confirm: the sample
stays in the batch for the whole run and keeps its last successful iterate (pushed further into the
adversarial region), as AutoAttack's APGD does with ``eot_iter``.

Costs per sample, counted exactly: every step evaluates the loss and its input gradient at the new
iterate (``eot`` forward and backward passes each); the last iterate of a run is only evaluated
(``eot`` forwards, no gradient). A run of ``steps`` therefore costs ``steps * eot`` gradients and
``(steps + 1) * eot`` forwards on a sample it does not break. APGD-T also spends ``eot`` forwards on
the clean image, to rank the target classes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from robustlab.attacks.active import Active
from robustlab.attacks.base import (
    Attack,
    AttackResult,
    eot_gradient,
    model_objective,
    register_attack,
)
from robustlab.errors import RobustlabError
from robustlab.losses import cross_entropy, dlr

MOMENTUM = 0.75  # weight of the new gradient step; 1 - MOMENTUM goes to the previous update
INITIAL_STEP = 2.0  # the step size starts at INITIAL_STEP * eps (in the threat model's norm)

# APGD-L1 (Croce & Hein 2021, "Mind the box: l1-APGD for sparse adversarial attacks on image
# classifiers"): sparse steps whose sparsity adapts to that of the best point found.
L1_INITIAL_STEP = 1.0  # times eps, also the largest step
L1_MIN_STEP_RATIO = 10.0  # the step never falls below L1_INITIAL_STEP * eps / L1_MIN_STEP_RATIO
L1_STEP_DECAY = 1.5  # step size and sparsity divisor at a checkpoint
L1_INITIAL_FRACTION = 0.2  # fraction of the coordinates the first steps move
L1_SPARSER = 0.95  # the best point counts as sparser if it has fewer than this fraction of changes

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l1_checkpoints(steps: int) -> list[int]:
    """APGD-L1 adapts its step size and sparsity every 4% of the iterations (at least every one)."""
    every = max(int(0.04 * steps), 1)
    return list(range(every, steps, every))


def checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD may halve its step size: ``w_j = ceil(p_j * steps)`` for
    ``p_0 = 0``, ``p_1 = 0.22`` and ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, keeping the
    distinct values in ``[1, steps]`` (for 100 steps: 22, 41, 57, 70, 80, 87, 93, 99).

    The p_j are multiples of 0.01, so they are computed in whole hundredths: no rounding error can
    move a checkpoint.
    """
    if steps < 1:
        raise RobustlabError(f"steps must be >= 1, got {steps}")
    out: list[int] = []
    prev, cur = 0, 22  # hundredths
    while cur <= 100:
        w = -(-cur * steps // 100)  # ceil
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)
    return out


class APGDBase(Attack):
    """The APGD loop shared by the registered variants (they differ in objective and targets).

    steps: iterations per run; restarts: runs from new random starts, each only on samples not yet
    broken; eot: forward/backward passes averaged per evaluation (expectation over transformation,
    for randomized models); rho: condition-1 threshold, the fraction of steps since the last
    checkpoint in which the loss must have increased to keep the step size.
    """

    defaults = {"steps": 100, "restarts": 1, "eot": 1, "rho": 0.75}
    norms = ("linf", "l2", "l1")
    dense = True

    def validate(self) -> None:
        super().validate()
        if self.params["eot"] < 1:
            raise RobustlabError(f"attack {self.name!r}: eot must be >= 1, got {self.params['eot']}")
        if not 0.0 < self.params["rho"] <= 1.0:
            raise RobustlabError(f"attack {self.name!r}: rho must be in (0, 1], got {self.params['rho']}")

    # ------------------------------------------------------------------ evaluation

    def _evaluate(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, objective: Objective, grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, per-sample objective, input gradient of the objective or None), each averaged over
        ``eot`` passes. Parameters get no gradient: autograd is asked for the input's only."""
        forward, value = model_objective(model, lambda out: objective(out, labels), x.shape[0],
                                         dense=labels.dim() == 3)  # per-pixel labels (N, H, W); MM passes (N, 2) pairs
        return eot_gradient(forward, value, x, self.params["eot"], grad=grad)

    def _l1_step(self, g: torch.Tensor, step: torch.Tensor, frac: torch.Tensor, x_cur: torch.Tensor) -> torch.Tensor:
        """The sparse L1 step: ``step`` (L1 norm, per sample) spread evenly over the coordinates with
        the largest ``|g|``, a fraction ``frac`` (per sample) of all, moved along ``sign(g)``.
        Coordinates that sit on the face of the box the gradient pushes towards cannot move and are
        left out (this is what makes the step effective: "mind the box")."""
        flat = g.flatten(1)
        x = x_cur.flatten(1)
        blocked = ((x <= self.threat.lower) & (flat < 0)) | ((x >= self.threat.upper) & (flat > 0))
        mag = flat.abs().masked_fill(blocked, 0.0)
        d = flat.shape[1]
        k = (frac * d).round().clamp(1, d).long()
        kth = mag.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        chosen = (mag >= kth) & (mag > 0)
        count = chosen.sum(dim=1, keepdim=True).clamp_min(1)
        direction = flat.sign() * chosen / count
        return (step.unsqueeze(1) * direction).view_as(g)

    # ------------------------------------------------------------------ one run

    def _run(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y0: torch.Tensor,
        labels: torch.Tensor,
        objective: Objective,
        generator: torch.Generator | None,
    ) -> Active:
        """One APGD run of ``steps`` iterations from a random start on the batch ``x0``.

        ``y0`` are the labels success is judged on (true labels, or targets if ``self.targeted``),
        ``labels`` the ones ``objective`` takes. Returns per sample: the point (the first successful
        iterate, else the best-loss one), success, gradients and forwards spent, the best objective.
        """
        p, threat = self.params, self.threat
        steps, eot, rho = p["steps"], p["eot"], p["rho"]
        m = x0.shape[0]
        dev = x0.device
        run = Active(x0)
        l1 = threat.norm == "l1"
        ckpts = set(l1_checkpoints(steps) if l1 else checkpoints(steps))
        eps = threat.eps

        x_cur = threat.random_init(x0, generator)
        logits, f, g = self._evaluate(model, x_cur, labels, objective, grad=True)
        run.spend(gradients=eot, forwards=eot)
        # Per-sample state; rows leave together when their sample is broken.
        s = {
            "x0": x0, "y0": y0, "labels": labels,
            "x_cur": x_cur, "x_prev": x_cur, "g": g,
            "x_best": x_cur, "g_best": g, "f_best": f, "f_prev": f,
            "step": torch.full((m,), (L1_INITIAL_STEP if l1 else INITIAL_STEP) * eps, dtype=x0.dtype, device=dev),
            "n_up": torch.zeros(m, dtype=torch.long, device=dev),  # loss increases since the last checkpoint
            "f_ckpt": f, "reduced": torch.zeros(m, dtype=torch.bool, device=dev),
        }
        if l1:
            # The fraction of coordinates a step moves, and the sparsity of the best point at the last
            # checkpoint (Croce & Hein 2021).
            d = x0[0].numel()
            s["frac"] = torch.full((m,), L1_INITIAL_FRACTION, dtype=x0.dtype, device=dev)
            s["sp_old"] = torch.full((m,), float(d), dtype=x0.dtype, device=dev)
        last_ckpt = 0
        for k in range(steps + 1):
            if k > 0:
                x_cur, x_prev = s["x_cur"], s["x_prev"]
                if l1:  # a sparse step, no momentum
                    z = threat.project(x_cur + self._l1_step(s["g"], s["step"], s["frac"], x_cur), s["x0"])
                else:
                    z = threat.project(x_cur + threat.steepest_step(s["g"], s["step"]), s["x0"])
                    if k > 1:  # momentum on the previous update
                        z = threat.project(x_cur + MOMENTUM * (z - x_cur) + (1 - MOMENTUM) * (x_cur - x_prev), s["x0"])
                s["x_prev"], s["x_cur"] = x_cur, z
                last = k == steps
                logits, f, g = self._evaluate(model, z, s["labels"], objective, grad=not last)
                run.spend(gradients=0 if last else eot, forwards=eot)
                s["g"] = g
            if eot > 1:  # keep attacking: the last successful iterate survives a fresh vote better
                ok = self.is_success(logits, s["y0"])
                s["ok"] = ok if k == 0 else s["ok"] | ok
                s["x_ok"] = s["x_cur"] if k == 0 else torch.where(ok.view(-1, *[1] * (x0.dim() - 1)), s["x_cur"], s["x_ok"])
            elif run.retire(self.is_success(logits, s["y0"]), s["x_cur"], f):
                if not run:
                    return run
                s, f = run.kept(s, f)
            if k == 0:
                continue
            s["n_up"] += f > s["f_prev"]
            s["f_prev"] = f
            better = f > s["f_best"]
            s["f_best"] = torch.where(better, f, s["f_best"])
            b4 = better.view(-1, *[1] * (x0.dim() - 1))
            s["x_best"] = torch.where(b4, s["x_cur"], s["x_best"])
            if s["g"] is not None:
                s["g_best"] = torch.where(b4, s["g"], s["g_best"])
            if k in ckpts and l1:
                # L1: if the best point got sparser (by 5%) since the last checkpoint, continue from it
                # with the full step size; otherwise shrink the step. Future steps move 1/1.5 of as
                # many coordinates as the best point has changed.
                sp = (s["x_best"] != s["x0"]).flatten(1).sum(dim=1).to(s["step"].dtype)
                restart = sp < L1_SPARSER * s["sp_old"]
                s["frac"] = sp / d / L1_STEP_DECAY
                s["step"] = torch.where(restart, L1_INITIAL_STEP * eps, s["step"] / L1_STEP_DECAY).clamp(
                    L1_INITIAL_STEP * eps / L1_MIN_STEP_RATIO, L1_INITIAL_STEP * eps)
                s["sp_old"] = sp
                r4 = restart.view(-1, *[1] * (x0.dim() - 1))
                s["x_cur"] = torch.where(r4, s["x_best"], s["x_cur"])
                s["g"] = torch.where(r4, s["g_best"], s["g"])
                s["f_prev"] = torch.where(restart, s["f_best"], s["f_prev"])
            elif k in ckpts and k < steps:
                # Condition 1: the loss rose in fewer than rho of the steps since the last checkpoint.
                # Condition 2: the step size was kept at the last checkpoint and the best loss has not
                # improved since. Either: halve the step and continue from the best point.
                cond1 = s["n_up"].to(f.dtype) < rho * (k - last_ckpt)
                cond2 = ~s["reduced"] & (s["f_best"] <= s["f_ckpt"])
                reduce = cond1 | cond2
                r4 = reduce.view(-1, *[1] * (x0.dim() - 1))
                s["step"] = torch.where(reduce, s["step"] / 2, s["step"])
                s["x_cur"] = torch.where(r4, s["x_best"], s["x_cur"])
                s["g"] = torch.where(r4, s["g_best"], s["g"])
                s["f_prev"] = torch.where(reduce, s["f_best"], s["f_prev"])
                s["reduced"], s["f_ckpt"] = reduce, s["f_best"]
                s["n_up"] = torch.zeros_like(s["n_up"])
                last_ckpt = k
        if eot > 1:
            ok4 = s["ok"].view(-1, *[1] * (x0.dim() - 1))
            run.close(torch.where(ok4, s["x_ok"], s["x_best"]), success=s["ok"], value=s["f_best"])
        else:
            run.close(s["x_best"], value=s["f_best"])
        return run

    # ------------------------------------------------------------------ the attack

    def _objective(self) -> Objective:
        raise NotImplementedError

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        found = Active(x)
        if self.threat.eps == 0:
            # Nothing to search: one evaluation of the clean images.
            logits, _, _ = self._evaluate(model, x, y, self._objective(), grad=False)
            found.forwards += self.params["eot"]
            found.success = self.is_success(logits, y)
            return found.result()
        objective = self._objective()
        for _ in range(self.params["restarts"]):
            idx = found.unbroken()
            if idx.numel() == 0:
                break
            y0 = y[idx]
            found.merge(idx, self._run(model, x[idx], y0, y0, objective, generator))
        return found.result()


@register_attack
class APGDCE(APGDBase):
    """APGD on the cross-entropy loss (AutoAttack's first attack). Targeted runs (``targeted=True``,
    labels are targets) minimize the targets' cross-entropy."""

    name = "apgd-ce"

    def with_loss(self, loss: str) -> "APGDBase":
        """APGD-DLR with these parameters for ``loss="dlr"``; itself for other losses."""
        return APGDDLR(self.threat, targeted=self.targeted, **self.params) if loss == "dlr" else self

    def _objective(self) -> Objective:
        targeted = self.targeted
        return lambda logits, labels: cross_entropy(logits, labels, targeted)


@register_attack
class APGDDLR(APGDBase):
    """APGD on the difference-of-logits-ratio loss, invariant to rescaling of the logits (needs 3
    classes; targeted: 4)."""

    name = "apgd-dlr"

    def _objective(self) -> Objective:
        targeted = self.targeted
        return lambda logits, labels: dlr(logits, labels, targeted)


@register_attack
class APGDT(APGDBase):
    """APGD-T: targeted DLR against each of the ``n_target_classes`` classes with the highest clean
    logits after the top one, one run (``restarts`` runs) per target class, each only on the samples
    still robust. It takes the true labels and succeeds on any misclassification, like an untargeted
    attack (so ``targeted`` must be False). Needs 4 classes."""

    name = "apgd-t"
    defaults = {**APGDBase.defaults, "n_target_classes": 9}
    dense = False  # ranks target classes per image

    def validate(self) -> None:
        super().validate()
        if self.targeted:
            raise RobustlabError(
                "attack 'apgd-t' picks its own target classes and takes the true labels: use targeted=False "
                "(for given targets use apgd-ce or apgd-dlr with targeted=True)"
            )
        if self.params["n_target_classes"] < 1:
            got = self.params["n_target_classes"]
            raise RobustlabError(f"attack 'apgd-t': n_target_classes must be >= 1, got {got}")

    def _objective(self) -> Objective:
        return lambda logits, targets: dlr(logits, targets, True)

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator) -> AttackResult:
        found = Active(x)
        eot = self.params["eot"]
        # Rank the classes by the clean logits (this also finds the already misclassified samples).
        logits, _, _ = self._evaluate(model, x, y, lambda out, labels: out[:, 0], grad=False)
        found.forwards += eot
        found.success = self.is_success(logits, y)
        if logits.shape[1] < 4:
            dlr(logits, y, True)  # raises the clear error about the number of classes
        if self.threat.eps == 0:
            return found.result()
        ranked = logits.argsort(dim=1, descending=True)
        objective = self._objective()
        for rank in range(1, min(self.params["n_target_classes"], logits.shape[1] - 1) + 1):
            for _ in range(self.params["restarts"]):
                idx = found.unbroken()
                if idx.numel() == 0:
                    return found.result()
                targets = ranked[idx, rank]
                found.merge(idx, self._run(model, x[idx], y[idx], targets, objective, generator))
        return found.result()
