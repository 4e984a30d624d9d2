"""Early stopping on broken points: the bookkeeping every iterative attack shares.

An attack works on the rows of a batch that are still robust and drops a row at its first
success, so no compute is spent on it afterwards. :class:`Active` keeps which rows are still
attacked (``pos``, their positions in the batch), what was found for the others, and the per-sample
costs; the attack keeps its own per-sample state (current point, momentum, labels, ...) aligned with
``pos`` through :meth:`Active.kept`::

    found = Active(x)
    for _ in range(restarts):
        if not found.restart():                     # each run only on the rows not broken yet
            break
        x0, y0 = x[found.pos], y[found.pos]
        for step in range(steps):
            logits, g = ...                         # at x_cur
            found.spend(gradients=1, forwards=1)    # per row still attacked
            if found.retire(is_success(logits, y0), x_cur):
                x0, y0, x_cur, g = found.kept(x0, y0, x_cur, g)
                if not found:
                    break
            x_cur = ...
        found.close(x_cur)                          # the rows never broken end where they are
    return found.result()

Attacks that run several times on the survivors and keep the best point per sample (APGD, MD,
Square) run each time on a fresh :class:`Active` of the survivors and :meth:`Active.merge` it into
the batch's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustlab.attacks.base import AttackResult


class Active:
    """Per-sample results of an attack on a batch, and the rows it still attacks.

    x_adv: each sample's point so far (the clean image to start with); success; gradients and
    forwards spent; value: the attack's own score of the point (a best loss or margin; ``-inf``
    until one is recorded), for attacks that compare runs; pos: the rows still attacked.
    """

    def __init__(self, x: torch.Tensor) -> None:
        n, dev = x.shape[0], x.device
        self.x_adv = x.clone()
        self.success = torch.zeros(n, dtype=torch.bool, device=dev)
        self.gradients = torch.zeros(n, dtype=torch.long, device=dev)
        self.forwards = torch.zeros(n, dtype=torch.long, device=dev)
        self.value = torch.full((n,), -math.inf, device=dev)
        self.pos = torch.arange(n, device=dev)
        self._spent = [0, 0]  # gradients, forwards spent by every row still attacked, since the restart
        self._keep: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pos.numel()

    def unbroken(self) -> torch.Tensor:
        """Positions of the samples not broken yet."""
        return (~self.success).nonzero(as_tuple=True)[0]

    def restart(self) -> bool:
        """Attack the samples not broken yet (costs counted afresh); False if there are none."""
        self.pos = self.unbroken()
        self._spent = [0, 0]
        return len(self) > 0

    def spend(self, gradients: int = 0, forwards: int = 0) -> None:
        """Every row still attacked spent this many input gradients and forward passes."""
        self._spent[0] += gradients
        self._spent[1] += forwards

    def _charge(self, rows: torch.Tensor) -> None:
        self.gradients[rows] += self._spent[0]
        self.forwards[rows] += self._spent[1]

    def retire(self, done: torch.Tensor, x: torch.Tensor, value: torch.Tensor | None = None) -> bool:
        """The rows still attacked where ``done`` (bool, aligned with ``pos``) are broken at ``x``
        (their rows of it) with score ``value``: record them and stop attacking them. Returns whether
        any were; then :meth:`kept` filters the attack's per-sample state the same way."""
        if not bool(done.any()):
            return False
        hit = self.pos[done]
        self.x_adv[hit] = x[done]
        self.success[hit] = True
        self._charge(hit)
        if value is not None:
            self.value[hit] = value[done].to(self.value.dtype)
        self._keep = ~done
        self.pos = self.pos[self._keep]
        return True

    def kept(self, *state: Any) -> tuple[Any, ...]:
        """Each per-sample tensor (rows aligned with ``pos`` before the last :meth:`retire`), or dict
        of them, without the rows that retired; ``None`` stays ``None``."""
        return tuple(self._filter(s) for s in state)

    def _filter(self, s: Any) -> Any:
        if s is None:
            return None
        if isinstance(s, dict):
            return {k: self._filter(v) for k, v in s.items()}
        return s[self._keep]

    def close(self, x: torch.Tensor, success: torch.Tensor | None = None, value: torch.Tensor | None = None) -> None:
        """The rows still attacked end the run at ``x`` (their rows of it), successful where
        ``success`` says so (not at all without it), with score ``value``."""
        self.x_adv[self.pos] = x
        if success is not None:
            self.success[self.pos] = success
        if value is not None:
            self.value[self.pos] = value.to(self.value.dtype)
        self._charge(self.pos)

    def merge(self, idx: torch.Tensor, run: "Active") -> None:
        """The results of a run on the samples ``idx`` of this batch: costs add up; a sample takes
        the run's point if the run broke it or scored it higher than anything before."""
        self.gradients[idx] += run.gradients
        self.forwards[idx] += run.forwards
        take = run.success | (run.value > self.value[idx])
        sel = idx[take]
        self.x_adv[sel] = run.x_adv[take]
        self.value[sel] = run.value[take]
        self.success[idx[run.success]] = True

    def result(self) -> AttackResult:
        return AttackResult(self.x_adv, self.success, self.gradients, self.forwards)
