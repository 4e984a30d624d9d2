"""Where one batch's attack ensemble stands between two of its attacks, so that a killed run goes on
from the last attack it finished instead of the start of the batch.

An ensemble such as ``standard`` can spend many minutes on one batch (Square's 5000 queries per
robust point); the runner saves this state after an attack when a while has passed since the batch
began or was last saved (:data:`SAVE_SECONDS`), and the batch's final rows replace it. Each attack's
randomness comes from (seed, task, batch, attack), so going on from a saved state gives exactly the
numbers of an uninterrupted batch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Save a batch's state after an attack once this many seconds have passed since the batch began or
# was last saved (quick batches are never saved half-done: redoing them costs less than the writes).
SAVE_SECONDS = 60.0

_TENSORS = ("clean_pred", "correct", "robust", "broken_by", "adv_pred", "distance", "min_distance", "gradients",
            "forwards")


@dataclass
class BatchState:
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
    def start(cls, x: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor) -> "BatchState":
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
    def from_bytes(cls, blob: bytes, x: torch.Tensor) -> "BatchState":
        """Rebuild a saved state for the batch ``x`` (on its device)."""
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            arrays = {name: torch.from_numpy(f[name]).to(x.device) for name in _TENSORS}
            kept = torch.from_numpy(f["kept"]).to(x.device)
            kept_x_adv = torch.from_numpy(f["kept_x_adv"].astype(np.float32)).to(x.device, x.dtype)
            meta = json.loads(f["meta"].tobytes())
        x_adv = x.clone()
        x_adv[kept] = kept_x_adv
        return cls(x_adv=x_adv, **arrays, **meta)
