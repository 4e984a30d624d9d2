"""Image quilting (Guo et al. 2018): each patch of the input is replaced by a patch of clean training
images, drawn at random among the ``neighbors`` nearest ones, so the output is made of clean pieces.

Simplification, said plainly: patches are laid on a grid without overlap, so there is no minimum-error
seam between neighbouring patches as in Efros & Freeman's quilting; the defense's mechanism (a
non-differentiable, randomized projection onto clean patches) is the same, and so is the attack that
breaks it: BPDA with the identity and EOT over the random choices (Athalye et al. 2018). The defense
also declares its own attack, ``quilting-search`` (:mod:`robustlab.attacks.quilting_search`), a search
over which library patches each position can be made to take.

Cost: the nearest-neighbour search (a distance to every library patch) is most of the defense's work
and does not depend on the random choice, so the neighbours of the last batch are kept and reused when
the same batch comes again: an attack's EOT draws and a prediction's vote over draws search once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.defenses.base import Defense, register_defense
from robustlab.errors import RobustlabError


@register_defense
class Quilting(Defense):
    """Image quilting: ``library`` is a data set (``NAME[:SPLIT]``, files from $ROBUSTLAB_DATA, default
    split train) from whose first ``library_images`` images ``library_patches`` random patches of
    ``patch`` x ``patch`` pixels are cut; each input patch becomes one of its ``neighbors`` nearest."""

    name = "quilting"
    defaults = {"library": "", "library_images": 2000, "library_patches": 20000, "patch": 4, "neighbors": 10,
                "draws": 8, "seed": 0}
    randomized = True
    differentiable = False
    adaptive_attacks = ("quilting-search",)

    def validate(self) -> None:
        p = self.params
        if not p["library"]:
            raise RobustlabError("defense 'quilting' needs its patch library: library=DATASET[:SPLIT] (clean training "
                                 "images, e.g. library=cifar10:train)")
        if not 2 <= p["patch"] <= 16 or p["neighbors"] < 1 or p["draws"] < 1 or p["library_patches"] < p["neighbors"]:
            raise RobustlabError("defense 'quilting': patch must be in 2..16, neighbors and draws >= 1, and "
                                 "library_patches >= neighbors")
        self._patches: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (patches of the last batch, their neighbours)
        self._build()  # a missing library fails here, before anything runs

    def _build(self) -> torch.Tensor:
        if self._patches is None:
            from robustlab.data import load_dataset

            p = self.params
            name, _, split = p["library"].partition(":")
            data = load_dataset(name, split or "train")
            images = data.batch(range(min(p["library_images"], len(data))))[0]
            k = p["patch"]
            g = torch.Generator().manual_seed(p["seed"])
            n, c, h, w = images.shape
            which = torch.randint(n, (p["library_patches"],), generator=g)
            top = torch.randint(h - k + 1, (p["library_patches"],), generator=g)
            left = torch.randint(w - k + 1, (p["library_patches"],), generator=g)
            rows = (top.view(-1, 1) + torch.arange(k)).view(-1, k, 1)
            cols = (left.view(-1, 1) + torch.arange(k)).view(-1, 1, k)
            patches = images[which.view(-1, 1, 1, 1), torch.arange(c).view(1, -1, 1, 1), rows.unsqueeze(1), cols.unsqueeze(1)]
            self._patches, self._shape = patches.flatten(1), (c, h, w)
        return self._patches

    def library(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The library patches (M, C * patch * patch), flattened as :meth:`to_patches` flattens."""
        return self._build().to(device, dtype)

    def to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The patches the defense replaces, (N, P, C * patch * patch): the image padded (replicating its
        edge) to a multiple of the patch size, cut on a grid without overlap."""
        k = self.params["patch"]
        n, c, h, w = x.shape
        if c != self._shape[0]:
            raise RobustlabError(f"defense 'quilting': the library has {self._shape[0]}-channel images, the inputs {c}")
        padded = F.pad(x, (0, -w % k, 0, -h % k), mode="replicate")
        return F.unfold(padded, k, stride=k).transpose(1, 2)

    def from_patches(self, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The image of ``size`` (H, W) that :meth:`to_patches` would cut into ``patches`` (N, P, D)."""
        k = self.params["patch"]
        h, w = size
        out = F.fold(patches.transpose(1, 2), (h + -h % k, w + -w % k), k, stride=k)
        return out[..., :h, :w]

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        library = self.library(x.device, x.dtype)
        cols = self.to_patches(x)
        flat = cols.reshape(-1, cols.shape[-1])
        near = self._neighbors(flat.detach(), library)
        pick = torch.randint(self.params["neighbors"], (len(flat),), generator=generator,
                             device=generator.device if generator is not None else "cpu").to(x.device)
        chosen = library[near[torch.arange(len(flat), device=x.device), pick]]
        return self.from_patches(chosen.view(cols.shape), x.shape[-2:])

    def nearest(self, flat: torch.Tensor, library: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Indices (rows, neighbors) of the library patches nearest each row of ``flat``, in chunks of
        rows (no reuse: for many different queries at once, as an attack's candidates)."""
        k = self.params["neighbors"]
        return torch.cat([torch.cdist(part, library).topk(k, dim=1, largest=False).indices
                          for part in flat.split(chunk)]) if len(flat) else flat.new_zeros((0, k), dtype=torch.long)

    def _neighbors(self, flat: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """:meth:`nearest` for the rows of ``flat``; the last batch's are reused when the same patches
        come again (EOT draws, prediction votes)."""
        last = self._last
        if last is not None and last[0].shape == flat.shape and last[0].device == flat.device and torch.equal(last[0], flat):
            return last[1]
        near = self.nearest(flat, library)
        self._last = (flat.clone(), near)
        return near
