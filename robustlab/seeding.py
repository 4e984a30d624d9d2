"""Explicit randomness: generators derived from (seed, *keys), so a resumed or sharded run draws
exactly the numbers an uninterrupted one does."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on ``seed`` and every key (e.g. batch index, attack index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in keys]])
    return int(state.generate_state(1, dtype=np.uint64)[0]) >> 1


def make_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
