"""Extra unlabeled images for semi-supervised adversarial training (``rst``, ``uat``).

:class:`UnlabeledData` holds the images and the share of every training batch drawn from them;
:func:`load_unlabeled` reads them from a spec (a data set ``NAME[:SPLIT]`` whose labels are dropped,
or a folder of images). :class:`UnlabeledSampler` says which unlabeled images each batch takes: it
walks through a sequence of permutations of the set (pass ``p`` is shuffled by a generator derived
from ``(seed, UNLABELED_KEY, p)``), so every image is used once per pass, independently of the
labeled epochs. Its only state is a cursor (images drawn so far), stored in the training state, so
a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustlab.checks import check_images
from robustlab.data import Dataset, load_dataset
from robustlab.data.image_folder import load_unlabeled_images
from robustlab.errors import RobustlabError
from robustlab.seeding import make_generator

UNLABELED_KEY = 0x554C  # seeding key of the unlabeled passes ("UL")


@dataclass(eq=False)
class UnlabeledData:
    """Images without labels to mix into training batches.

    x: float32 (N, C, H, W) in [0, 1]; name: where they came from (recorded in the training state
    and the model card); fraction: the share of each training batch drawn from them, in (0, 1)
    (``round(fraction * batch_size)`` images, at least one labeled and one unlabeled per batch).
    """

    x: torch.Tensor
    name: str = "unlabeled"
    fraction: float = 0.5

    def __post_init__(self) -> None:
        check_images(self.x, what=f"unlabeled images ({self.name})")
        if self.x.dtype != torch.float32:
            raise RobustlabError(f"unlabeled images must be float32, got {self.x.dtype}")
        if not 0.0 < float(self.fraction) < 1.0:
            raise RobustlabError(f"the unlabeled fraction of a batch must be in (0, 1), got {self.fraction}")
        self.fraction = float(self.fraction)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def per_batch(self, batch_size: int) -> int:
        """Unlabeled images in a batch of ``batch_size``: ``round(fraction * batch_size)``, which must
        leave at least one labeled and one unlabeled image."""
        k = int(round(self.fraction * batch_size))
        if not 1 <= k <= batch_size - 1:
            raise RobustlabError(
                f"an unlabeled fraction of {self.fraction} of a batch of {batch_size} leaves {k} unlabeled and "
                f"{batch_size - k} labeled images; each batch needs at least one of both"
            )
        return k

    def describe(self) -> dict[str, Any]:
        """JSON description (part of a run's identity: resuming with other unlabeled data is refused)."""
        return {"name": self.name, "n": len(self), "fraction": self.fraction}


class UnlabeledSampler:
    """Indices of the unlabeled images of each batch: consecutive slices of an endless sequence of
    seeded permutations of ``range(n)``. ``cursor`` counts the images drawn so far."""

    def __init__(self, n: int, seed: int, cursor: int = 0) -> None:
        if n < 1:
            raise RobustlabError("the unlabeled set is empty")
        self.n, self.seed, self.cursor = int(n), int(seed), int(cursor)
        self._pass: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, p: int) -> torch.Tensor:
        if self._pass != p:
            self._pass, self._perm = p, torch.randperm(self.n, generator=make_generator(self.seed, UNLABELED_KEY, p))
        assert self._perm is not None
        return self._perm

    def draw(self, k: int) -> torch.Tensor:
        """The next ``k`` indices (int64), crossing into the next pass when this one runs out."""
        parts = []
        while k > 0:
            p, offset = divmod(self.cursor, self.n)
            take = min(k, self.n - offset)
            parts.append(self._permutation(p)[offset : offset + take])
            self.cursor += take
            k -= take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("n", self.n)) != self.n:
            raise RobustlabError(f"the saved unlabeled sampler covered {state.get('n')} images, not {self.n}")
        self.cursor = int(state["cursor"])


def load_unlabeled(
    spec: str,
    like: Dataset,
    fraction: float = 0.5,
    root: str | Path | None = None,
) -> UnlabeledData:
    """Read the unlabeled images named by ``spec``: a folder of images (any layout, labels ignored),
    or a data set ``NAME[:SPLIT]`` (default split ``train``) read with ``load_dataset`` from
    ``root``, whose labels are dropped. The images must have the channels of ``like`` (the labeled
    training set); square ones are resized to its size. ``fraction``: the share of each batch."""
    if not isinstance(spec, str) or not spec.strip():
        raise RobustlabError("--unlabeled needs a data set NAME[:SPLIT] (e.g. mnist:train) or a folder of images")
    spec = spec.strip()
    c, h, w = like.image_shape
    size = h if h == w else None
    if Path(spec).expanduser().is_dir():
        x = load_unlabeled_images(spec, image_size=size)
    else:
        name, _, split = spec.partition(":")
        x = load_dataset(name, split or "train", root=root, image_size=size, stream=False).x
    if tuple(x.shape[1:]) != (c, h, w):
        raise RobustlabError(
            f"unlabeled images {spec!r} have shape {tuple(x.shape[1:])} (C, H, W), the training images {(c, h, w)}"
        )
    return UnlabeledData(x, spec, fraction)
