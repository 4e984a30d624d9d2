"""The worst-case ensemble as an attack: attacks run in order, each only on the points the previous
ones left robust, keeping per sample the first verified adversarial example.

``WorstCaseEnsemble(attacks).run(model, x, y)`` is an ordinary attack (usable outside the runner).
The adversarial evaluation runs the same loop through :meth:`WorstCaseEnsemble.run_state`, with its
re-verification of every claim and its per-batch state (:class:`EnsembleState`), which it saves
between two attacks so that a killed run goes on from the last attack it finished instead of the
start of the batch. Each attack's randomness comes from a generator per (batch, attack), so going on
from a saved state gives exactly the numbers of an uninterrupted batch.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from robustlab.attacks.base import Attack, AttackResult
from robustlab.checks import check_logits
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.predictor import predict

_TENSORS = ("clean_pred", "correct", "robust", "broken_by", "adv_pred", "distance", "min_distance", "gradients",
            "forwards")


@dataclass
class EnsembleState:
    """Per-sample outcomes of one batch after its first ``attacks_done`` attacks.

    x_adv holds the verified adversarial point of each broken sample (the clean image elsewhere);
    costs and rejected are per attack done, as the store records them for a finished batch.
    """

    attacks_done: int
    clean_pred: torch.Tensor
    correct: torch.Tensor
    robust: torch.Tensor
    broken_by: torch.Tensor
    adv_pred: torch.Tensor
    distance: torch.Tensor
    min_distance: torch.Tensor
    gradients: torch.Tensor
    forwards: torch.Tensor
    x_adv: torch.Tensor
    costs: list[dict[str, float]]
    rejected: int

    @classmethod
    def start(cls, x: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor) -> "EnsembleState":
        """Before the first attack: the correctly classified samples are the robust ones."""
        n, device = x.shape[0], x.device
        robust = clean_pred == y
        return cls(
            attacks_done=0, clean_pred=clean_pred, correct=robust.clone(), robust=robust,
            broken_by=torch.full((n,), -1, dtype=torch.long, device=device),
            adv_pred=torch.full((n,), -1, dtype=torch.long, device=device),
            distance=torch.full((n,), float("nan"), device=device),
            min_distance=torch.full((n,), float("inf"), device=device),
            gradients=torch.zeros(n, dtype=torch.long, device=device),
            forwards=torch.zeros(n, dtype=torch.long, device=device),
            x_adv=x.clone(), costs=[], rejected=0,
        )

    def to_bytes(self, keep_examples: int) -> bytes:
        """The state as ``.npz`` bytes. Of x_adv only the rows a report could keep are written: the
        first ``keep_examples`` broken samples (in float16, as the store keeps examples). Samples
        broken later cannot push a sample broken now out of the first ``keep_examples``."""
        arrays: dict[str, Any] = {name: getattr(self, name).cpu().numpy() for name in _TENSORS}
        kept = (self.broken_by >= 0).nonzero(as_tuple=True)[0][:keep_examples]
        arrays["kept"] = kept.cpu().numpy()
        arrays["kept_x_adv"] = self.x_adv[kept].cpu().numpy().astype(np.float16)
        arrays["meta"] = np.frombuffer(json.dumps(
            {"attacks_done": self.attacks_done, "costs": self.costs, "rejected": self.rejected}).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, x: torch.Tensor) -> "EnsembleState":
        """Rebuild a saved state for the batch ``x`` (on its device)."""
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            arrays = {name: torch.from_numpy(f[name]).to(x.device) for name in _TENSORS}
            kept = torch.from_numpy(f["kept"]).to(x.device)
            kept_x_adv = torch.from_numpy(f["kept_x_adv"].astype(np.float32)).to(x.device, x.dtype)
            meta = json.loads(f["meta"].tobytes())
        x_adv = x.clone()
        x_adv[kept] = kept_x_adv
        return cls(x_adv=x_adv, **arrays, **meta)


@dataclass
class Claims:
    """What a check of an attack's claimed successes found, per claimed point: ``ok`` (counts: a real
    adversarial example inside the threat model), ``misclassified`` (a real misclassification, inside
    the ball or not), ``pred`` (the prediction on it) and ``distance`` (its perturbation norm)."""

    ok: torch.Tensor
    misclassified: torch.Tensor
    pred: torch.Tensor
    distance: torch.Tensor


# check(x, x_adv, y) -> Claims, for the claimed points of one attack
ClaimCheck = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Claims]


class WorstCaseEnsemble:
    """Untargeted attacks on one threat model, run in order on still-robust points.

    ``run`` returns an :class:`AttackResult` whose success flags are the members' own claims checked
    by a fresh prediction of the model and the threat model (the evaluation runner checks claims with
    its full re-verification instead). Query and gradient counts are summed over the members.
    """

    name = "ensemble"
    kind = "ensemble"
    minimum_norm = False
    targeted = False

    def __init__(self, attacks: list[Attack]) -> None:
        if not attacks:
            raise RobustlabError("an ensemble needs at least one attack")
        self.attacks = list(attacks)
        self.threat = attacks[0].threat
        for a in attacks:
            if a.threat != self.threat:
                raise RobustlabError(
                    f"all attacks of an ensemble need one threat model; {a.name} has {a.threat}, not {self.threat}")
            if a.targeted:
                raise RobustlabError(f"the ensemble counts misclassifications; attack {a.name} is targeted")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "attacks": [a.config() for a in self.attacks]}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator | None = None) -> AttackResult:
        """Attack ``(x, y)``; member i draws from ``generator`` (or the global generator) in turn."""
        with eval_mode(model), torch.no_grad():
            clean = check_logits(model(x), x.shape[0]).argmax(dim=1)
        state = EnsembleState.start(x, y, clean)
        self.run_state(model, x, y, state, lambda i: generator, self.check_claims)
        success = state.correct & ~state.robust
        return AttackResult(state.x_adv, success, state.gradients, state.forwards)

    def check_claims(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> Claims:
        """A fresh prediction on each claimed point, and whether it lies in the threat model."""
        with eval_mode(model):
            pred = predict(model, x_adv)
        wrong = pred != y
        inside = self.threat.contains(x_adv, x, tol=1e-6)
        return Claims(wrong & inside, wrong, pred, self.threat.distance(x_adv, x))

    def run_state(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        state: EnsembleState,
        generator_for: Callable[[int], torch.Generator | None],
        check: Callable[..., Claims],
        on_attack: Callable[[str, int], None] | None = None,
        save: Callable[[EnsembleState], None] | None = None,
        save_seconds: float = 60.0,
    ) -> EnsembleState:
        """Run the attacks not yet done in ``state`` (from ``state.attacks_done`` on), updating it.

        ``generator_for(i)``: the generator attack i draws from; ``check(model, x, x_adv, y)``: the
        verdict on the points an attack claims (:class:`Claims`); ``on_attack(name, points)`` is called
        before each attack that runs; ``save(state)`` after an attack when another follows and
        ``save_seconds`` have passed since the batch began or was last saved."""
        s = state
        device = x.device
        last_save = time.perf_counter()
        for ai in range(s.attacks_done, len(self.attacks)):
            attack = self.attacks[ai]
            idx = s.robust.nonzero(as_tuple=True)[0]
            cost = {"seconds": 0.0, "gradients": 0, "forwards": 0}
            if idx.numel() and self.threat.eps > 0:
                if on_attack is not None:
                    on_attack(attack.name, idx.numel())
                t0 = time.perf_counter()
                res = attack.run(model, x[idx], y[idx], generator=generator_for(ai))
                s.gradients[idx] += res.gradients
                s.forwards[idx] += res.forwards
                claimed = res.success.nonzero(as_tuple=True)[0]
                if claimed.numel():
                    cand = idx[claimed]
                    v = check(model, x[cand], res.x_adv[claimed], y[cand])
                    # A minimum-norm attack may report points beyond eps: their distance is recorded, and
                    # they are not counted; from any other attack such a point is a rejected claim.
                    s.rejected += int((~v.ok).sum()) if not attack.minimum_norm else int((~v.misclassified).sum())
                    found = cand[v.misclassified]
                    s.min_distance[found] = torch.minimum(s.min_distance[found], v.distance[v.misclassified])
                    ok = v.ok
                    hit = cand[ok]
                    s.robust[hit] = False
                    s.broken_by[hit] = ai
                    s.adv_pred[hit] = v.pred[ok]
                    s.distance[hit] = v.distance[ok]
                    s.x_adv[hit] = res.x_adv[claimed][ok]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                cost = {
                    "seconds": time.perf_counter() - t0,
                    "gradients": int(res.gradients.sum()),
                    "forwards": int(res.forwards.sum()),
                }
            s.costs.append(cost)
            s.attacks_done = ai + 1
            if save is not None and ai + 1 < len(self.attacks) and time.perf_counter() - last_save >= save_seconds:
                save(s)
                last_save = time.perf_counter()
        return s
