"""Corruptions: named, registered, batched torch operations on images in [0, 1].

A corruption is a :class:`~robustlab.params.Configurable` with one parameter, ``severity`` (1-5). It
is a transform of the data seam (:mod:`robustlab.data.transforms`): ``c(x, generator=g)`` corrupts a
batch (N, C, H, W) in [0, 1] on ``x``'s device, drawing random numbers only from ``g`` (so a run is
deterministic from its seed, batch by batch), and returns a float32 batch of the same shape in [0, 1].

Constants differ by image size (ImageNet-C at 224 px, Tiny-ImageNet-C at 64 px, CIFAR-10-C at 32 px,
MNIST-C at 28 px). A corruption keeps them in ``tables``: image size -> one entry per severity.
:meth:`Corruption.table_entry` picks the table of the largest size not above the image's (the exact
one when there is one), and refuses images smaller than every table, naming the sizes it has. The
parameter ``table`` (0: by image size) names one table to use at any image size instead, e.g.
``table=224`` applies the ImageNet-C constants to 32 px images as the imagecorruptions package does.

``suite`` says which benchmark a corruption belongs to: ``imagenet-c`` (the 15), ``imagenet-c-extra``
(the 4 extra ones), ``mnist-c``. :func:`suite` lists a suite's corruptions in the published order.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustlab.errors import RobustlabError
from robustlab.params import Configurable, parse_spec
from robustlab.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)


class Corruption(Configurable):
    """Base class: set ``name``, ``suite``, ``family`` (noise, blur, weather, digital, geometric),
    ``randomized``, ``tables`` (size -> five entries) and implement :meth:`apply`."""

    component: ClassVar[str] = "corruption"
    defaults: ClassVar[dict[str, Any]] = {"severity": 1, "table": 0}
    suite_name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    randomized: ClassVar[bool] = False
    severities: ClassVar[tuple[int, ...]] = SEVERITIES  # the levels it has (MNIST-C's: one)
    tables: ClassVar[dict[int, tuple]] = {}

    def validate(self) -> None:
        if self.params["severity"] not in SEVERITIES:
            raise RobustlabError(f"{self.owner}: severity must be 1, 2, 3, 4 or 5, got {self.params['severity']}")
        table = self.params.get("table", 0)
        if table and table not in self.tables:
            have = ", ".join(str(s) for s in sorted(self.tables)) or "none"
            raise RobustlabError(f"{self.owner}: table={table} is not one of its tables ({have}; 0 picks by image size)")

    @property
    def severity(self) -> int:
        return int(self.params["severity"])

    def table_entry(self, size: int) -> Any:
        """This severity's constants for images of ``size`` pixels (the shorter side), or those of
        the table the ``table`` parameter names."""
        if not self.tables:
            raise RobustlabError(f"{self.owner} has no parameter table")
        if self.params.get("table"):
            return self.tables[self.params["table"]][self.severity - 1]
        fitting = [s for s in self.tables if s <= size]
        if not fitting:
            have = ", ".join(f"{s} px" for s in sorted(self.tables))
            raise RobustlabError(f"{self.owner} has parameters for images of {have}; these images are "
                                 f"{size} px (smaller than every table)")
        return self.tables[max(fitting)][self.severity - 1]

    def entry(self, x: torch.Tensor) -> Any:
        """:meth:`table_entry` for the batch ``x`` (its shorter side)."""
        return self.table_entry(min(x.shape[-2:]))

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The corruption of a float32 batch (N, C, H, W) in [0, 1]; implement in subclasses."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise RobustlabError(f"{self.owner} takes a batch (N, C, H, W), got shape {tuple(x.shape)}")
        out = self.apply(x.float(), generator)
        return out.clamp_(0.0, 1.0)

    def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return shape


CORRUPTIONS: Registry[type[Corruption]] = Registry("corruption")


def register_corruption(cls: type[Corruption]) -> type[Corruption]:
    """Class decorator: make a Corruption buildable by its ``name``."""
    return CORRUPTIONS.register(cls.name)(cls)


def create_corruption(spec: str | dict[str, Any], severity: int | None = None) -> Corruption:
    """A corruption from ``NAME[:severity=K]``, a ``{"name", "params"}`` config, or a name and a
    ``severity``."""
    if isinstance(spec, dict):
        name, params = spec["name"], dict(spec.get("params", {}))
    else:
        name, params = parse_spec(spec, "corruption")
    if severity is not None:
        params["severity"] = severity
    return CORRUPTIONS.get(name)(**params)


def suite(name: str) -> list[str]:
    """The corruptions of a suite (``imagenet-c``, ``imagenet-c-extra``, ``mnist-c``, or ``all-c``:
    the 15 and the 4 extra), in the order their classes were registered (the published order)."""
    if name == "all-c":
        return suite("imagenet-c") + suite("imagenet-c-extra")
    names = [n for n, cls in CORRUPTIONS._items.items() if cls.suite_name == name]
    if not names:
        known = sorted({cls.suite_name for cls in CORRUPTIONS._items.values()} | {"all-c"})
        raise RobustlabError(f"unknown corruption suite {name!r}; known: {', '.join(known)}")
    return names
