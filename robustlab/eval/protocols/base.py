"""The protocol seam: what an evaluation does per batch, and how its stored rows become numbers.

The runner (``robustlab.eval.runner.run``) owns everything generic: tasks split into batches of
fixed sample ranges, seeds, resume (done batches and a batch's saved partial state), sharding across
torchrun ranks, the store, progress. A protocol owns:

- ``config()``: its part of the run configuration (hashed with the rest: a resumed run must match);
- ``plan(n, image_dim)``: its tasks (name, kind, n, JSON params), e.g. the main evaluation, curve
  points, sanity checks;
- ``task_data(task, data)`` / ``task_model(task, model)``: what a task reads and runs on (the run's
  data and model unless its tasks each have their own, as zero-shot's data sets do);
- ``prepare(model, files, seed, device, log)``: once per run (and per resumed session) before any batch,
  for what a run fits once (the structured protocol's universal perturbations and patches): fit and
  keep the result in ``files`` (:class:`RunFiles`, bytes stored with the run), or take it from there
  when a resumed run kept it; under torchrun rank 0 prepares and the other ranks read its files;
- ``run_batch(model, x, y, task, ctx)``: the per-batch work, returning per-sample rows for its own
  table (``sample_table`` with ``sample_columns``), costs, rejected claims and examples to keep;
- ``final_checks(...)``: verdicts that need the live model (run once at the end);
- ``summarize(store, run, checks)`` (a classmethod): the summary computed from the store alone, with
  its :mod:`robustlab.eval.metrics` objects, so ``eval``, ``report`` and ``leaderboard`` read the
  same numbers, for finished and unfinished runs alike;
- ``leaderboard_group(run)`` (a classmethod): which runs are comparable, and the number they rank by;
  ``leaderboard_views(run)``: a run that holds several threat models (structured) is seen by the
  leaderboard as one run per threat model, each ranked in its own group.

How the next protocols plug in (one protocol module, one metric, one CLI command each):

- **certified** (randomized smoothing, bound propagation): ``plan`` gives one task per noise level or
  method; ``run_batch`` draws n0 + n noisy copies per image with a generator from the context
  (``ctx.generator()``), records per sample the prediction (or ABSTAIN), the certified radius (or
  verified / not) and the vote counts into ``certified_samples``; ``summarize`` feeds
  :class:`~robustlab.eval.metrics.CertifiedAccuracy` (certified accuracy at radii, ACR); the group is
  (dataset, noise, sigma). Its sanity check attacks the smoothed classifier at the certified radius.
- **corruption**: tasks are (corruption, severity) pairs plus a clean task; ``run_batch`` applies the
  corruption at the data transform seam with ``ctx.generator()`` and records correct / prediction
  into ``corruption_samples``; ``summarize`` feeds
  :class:`~robustlab.eval.metrics.CorruptionError` against the baseline run the config names (mCE).
- **segmentation** (``dense = True``: per-pixel logits (N, classes, H, W), per-pixel labels (N, H, W),
  checked by the runner before anything is written): ``plan`` gives ``main`` and one task per epsilon
  of the grid; ``run_batch`` runs every attack on every sample (the per-pixel loss averaged over the
  pixels), keeps per sample the image with the fewest correct pixels and records pixel and per-class
  intersection / union counts, clean and adversarial, into ``segmentation_samples``;
  :class:`~robustlab.eval.metrics.SegmentationScore` gives pixel accuracy and mIoU.
- **zero-shot** (``protocols/zero_shot.py``): one run, tasks = data sets x epsilons; each task reads
  its own data set and attacks its own zero-shot head (``task_data`` / ``task_model``); the config
  records class names and templates; rows go to ``zero_shot_samples``;
  :class:`~robustlab.eval.metrics.ZeroShotAccuracy` averages over data sets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from robustlab.eval.store import Example, ResultsStore
from robustlab.seeding import make_generator


@dataclass
class Task:
    """One unit of a run: ``n`` samples (the first n of the data) under fixed ``params`` (JSON,
    stored); ``work`` is whatever the protocol needs to run it (not stored)."""

    name: str
    kind: str
    n: int
    params: dict[str, Any] = field(default_factory=dict)
    work: Any = None


@dataclass
class BatchContext:
    """What the runner gives a protocol for one batch."""

    seed: int
    task: Task
    batch_index: int
    start: int  # position of the batch's first sample in the data set
    device: torch.device
    keep_examples: int = 0
    # progress: status(step name, points it works on)
    status: Callable[[str, int], None] | None = None
    # partial state of this batch saved by an earlier, killed session (None: start afresh), and how to
    # save one (None: this run cannot, e.g. under torchrun)
    saved: bytes | None = None
    save: Callable[[bytes], None] | None = None
    # this protocol's stored rows (by column name) of another task, for this batch's samples (None: not
    # available, e.g. under torchrun)
    done_rows: Callable[[str], list[Any]] | None = None

    def generator(self, *keys: int) -> torch.Generator:
        """A generator from (seed, task, batch, *keys): the same draws in a resumed or sharded run."""
        return make_generator(self.seed, zlib.crc32(self.task.name.encode()), self.batch_index, *keys,
                              device=self.device)


class RunFiles:
    """Bytes kept with a run by name (the store's ``run_files``), for what a protocol fits once per run.
    ``seen``: every name read or written, with its bytes (what other torchrun ranks are given)."""

    def __init__(self, load: Callable[[str], bytes | None], save: Callable[[str, bytes], None] | None = None) -> None:
        self._load, self._save = load, save
        self.seen: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        data = self._load(name)
        if data is not None:
            self.seen[name] = data
        return data

    def put(self, name: str, data: bytes) -> None:
        if self._save is None:
            raise RuntimeError(f"run file {name!r} is written by rank 0 only")
        self._save(name, data)
        self.seen[name] = data


@dataclass
class BatchOutput:
    """A finished batch: per-sample rows (the protocol table's columns, sample_index first), per-step
    costs ({seconds, gradients, forwards}), claims rejected by verification, examples to keep."""

    rows: list[Any]
    costs: list[dict[str, float]]
    rejected: int = 0
    examples: list[Example] = field(default_factory=list)


class Protocol:
    """Base class of evaluation protocols (see the module docstring)."""

    name: ClassVar[str] = ""
    sample_table: ClassVar[str] = ""
    sample_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: What the protocol evaluates: classifiers (logits (N, classes), labels (N,)) or, when True,
    #: segmentation models (per-pixel logits (N, classes, H, W), labels (N, H, W)). The runner checks
    #: model and data against it before anything is written.
    dense: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def attack_records(self) -> list[dict[str, Any]]:
        """Rows for the store's ``attacks`` table (name, params, targeted), if the protocol attacks."""
        return []

    def plan(self, n: int, image_dim: int) -> list[Task]:
        raise NotImplementedError

    def task_data(self, task: Task, data: Any) -> Any:
        """The data set a task's batches are read from: the run's own, unless a protocol's tasks each
        have theirs (zero-shot: one data set per task)."""
        return data

    def task_model(self, task: Task, model: nn.Module) -> nn.Module:
        """The model a task's batches run on: the run's own, unless a protocol's tasks each have theirs
        (zero-shot: each data set's zero-shot head over one shared vision-language model)."""
        return model

    def prepare(self, model: nn.Module, files: RunFiles, seed: int, device: torch.device,
                log: Callable[[str], None] = lambda msg: None) -> None:
        """What the run fits once before its batches (seeded by the run's ``seed``), kept in (or,
        resumed, read from) ``files``."""

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        raise NotImplementedError

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        return []

    @classmethod
    def normalize_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A stored configuration as this release would write it (for resuming older runs)."""
        return config

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    #: The summary's numbers a leaderboard shows, in order: the first ranks (higher is better; a name
    #: written "-key" ranks lower-is-better, e.g. "-mce"), the next ones break ties. Empty: every
    #: top-level number of the summary whose key ends in "accuracy". A key whose value is a map of
    #: numbers (certified accuracy per radius) gives one column per entry, ``key@entry``.
    leaderboard_columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """(key, title): runs with the same key are compared with each other (the leaderboard adds the
        protocol and the split to the key); an empty title lets the leaderboard write one."""
        return (run["dataset"], cls.name), f"{run['dataset']} · {cls.name}"

    @classmethod
    def leaderboard_views(cls, run: dict[str, Any]) -> list[dict[str, Any]]:
        """The run as the leaderboard ranks it: itself, or (a run of several threat models) one run dict
        per threat model, each with its own summary and config, grouped and ranked separately."""
        return [run]

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """Why this complete run is a weaker evaluation than its leaderboard group asks for (e.g. an
        attack list weaker than the standard one), one short phrase each; empty: full strength. A run
        with reasons is shown but never ranked. (The number of samples is the leaderboard's own check.)"""
        return []
