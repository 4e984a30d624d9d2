"""The corruption protocol: error under common corruptions (ImageNet-C / CIFAR-10-C / MNIST-C style),
corrupting on the fly, and mCE against a baseline.

Tasks: ``clean`` (the data as it is) and one task ``<corruption>:<severity>`` per corruption and
severity (a corruption with one level, like MNIST-C's, gets only severity 1). A batch is corrupted at
the data transform seam with the batch's generator (``ctx.generator()``: from seed, task and batch),
so a resumed or sharded run corrupts every image exactly as an uninterrupted one. Per-sample rows
(label, prediction, correct) go to ``corruption_samples``; the summary feeds
:class:`~robustlab.eval.metrics.CorruptionError` with the baseline errors recorded in the
configuration (a named baseline such as ``alexnet`` or another stored corruption run), giving error per
corruption and severity, CE, mCE and relative mCE.

Data that is already corrupted on disk (CIFAR-10-C files, ImageNet-C folders) runs through this
protocol too: :meth:`CorruptionProtocol.precorrupted` plans the same tasks from the stored
(corruption, severity) slices and reads each batch from its slice instead of corrupting (see
:mod:`robustlab.data.corrupted`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.corruptions import CORRUPTIONS, SEVERITIES, create_corruption
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import CorruptionError, wilson_interval
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import Example, ResultsStore
from robustlab.models.runtime import eval_mode
from robustlab.predictor import is_randomized, predict

CLEAN = "clean"
_PREDICT_KEY = 0x9D1C7  # generator key of a randomized model's prediction draws


def task_name(corruption: str, severity: int) -> str:
    return CLEAN if corruption == CLEAN else f"{corruption}:{severity}"


def corruption_tasks(corruptions: list[str], severities: tuple[int, ...] | None = None) -> list[tuple[str, int]]:
    """(corruption, severity) pairs, corruption-major: every corruption at each of ``severities`` it has
    (None: all of its own). Unknown names and severities outside 1-5 are refused in one line; so is
    an explicit severity that a corruption does not have (MNIST-C's have only 1)."""
    bad = [s for s in (severities or ()) if s not in SEVERITIES]
    if bad:
        raise RobustlabError(f"severity must be 1, 2, 3, 4 or 5, got {', '.join(map(str, bad))}")
    if not corruptions:
        raise RobustlabError("give at least one corruption")
    pairs = []
    for name in corruptions:
        cls = CORRUPTIONS.get(name)  # unknown names: the registry's one-line error
        own = tuple(cls.severities)
        wanted = own if severities is None else tuple(s for s in severities if s in own)
        if not wanted:
            raise RobustlabError(f"corruption {name!r} has severities {', '.join(map(str, own))} only, "
                                 f"not {', '.join(map(str, severities or ()))}")
        pairs += [(name, s) for s in wanted]
    return pairs


class _Generated:
    """A task's images: the batch corrupted on the fly (None: the clean batch)."""

    def __init__(self, corruption: Any) -> None:
        self.corruption = corruption

    def read(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self.corruption is None:
            return x, y
        return self.corruption(x, generator=ctx.generator()), y


class _Stored:
    """A task's images read from a data set of corrupted images (its slice for this task)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def read(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        xc, yc = self.data.batch(range(ctx.start, ctx.start + x.shape[0]))
        return xc.to(x.device), yc.to(y.device)


class CorruptionProtocol(Protocol):
    """Clean error and error under each (corruption, severity), with mCE against ``baseline``.

    ``corruptions``: registered names; ``severities``: None (each corruption's own levels) or a subset
    of 1-5; ``baseline``: (name, errors by corruption and severity) or None. For data already
    corrupted on disk use :meth:`precorrupted`.
    """

    name = "corruption"
    sample_table = "corruption_samples"
    sample_columns: ClassVar[tuple[tuple[str, str], ...]] = (
        ("label", "INTEGER NOT NULL"), ("prediction", "INTEGER NOT NULL"), ("correct", "INTEGER NOT NULL"),
    )

    def __init__(self, corruptions: list[str], severities: tuple[int, ...] | None = None,
                 baseline: tuple[str, dict[str, dict[int, float]]] | None = None) -> None:
        self.pairs = corruption_tasks(list(corruptions), severities) if corruptions else []
        self.baseline = baseline
        self.stored: Any = None  # a CorruptedDataset (precorrupted runs)
        self.with_clean = True
        self.tasks: list[Task] = []

    @classmethod
    def precorrupted(cls, stored: Any, baseline: tuple[str, dict[str, dict[int, float]]] | None = None,
                     with_clean: bool = False) -> CorruptionProtocol:
        """For images corrupted on disk: ``stored`` is a
        :class:`~robustlab.data.corrupted.CorruptedDataset` (``keys``: its (corruption, severity)
        slices, ``slice(c, s)``: one as a data set, all of the same length). The run's data set is
        the clean images when ``with_clean`` (a clean task is planned), else any one slice (it only
        sets the number of samples)."""
        protocol = cls([], None, baseline)
        protocol.pairs = list(stored.keys)
        protocol.stored = stored
        protocol.with_clean = with_clean
        return protocol

    def config(self) -> dict[str, Any]:
        names = [c for c, _ in self.pairs]
        config: dict[str, Any] = {
            "corruptions": sorted(set(names), key=names.index),
            "tasks": [task_name(c, s) for c, s in self.pairs],
            "baseline": None if self.baseline is None else {
                "name": self.baseline[0],
                "errors": {c: {str(s): e for s, e in per.items()} for c, per in self.baseline[1].items()},
            },
        }
        if self.stored is not None:
            config["precorrupted"] = self.stored.describe()
        return config

    def check_images(self, image_shape: tuple[int, int, int]) -> None:
        """Refuse, before a run starts, images a corruption cannot take (smaller than every table)."""
        if self.stored is None:
            for name, severity in self.pairs:
                create_corruption(name, severity).table_entry(min(image_shape[1:]))

    def plan(self, n: int, image_dim: int) -> list[Task]:
        tasks = []
        if self.with_clean:
            tasks.append(Task(CLEAN, CLEAN, n, {"corruption": CLEAN, "severity": 0}, _Generated(None)))
        for c, s in self.pairs:
            if self.stored is not None:
                part = self.stored.slice(c, s)
                tasks.append(Task(task_name(c, s), "corruption", min(n, len(part)), {"corruption": c, "severity": s},
                                  _Stored(part)))
            else:
                tasks.append(Task(task_name(c, s), "corruption", n, {"corruption": c, "severity": s},
                                  _Generated(create_corruption(c, s))))
        self.tasks = tasks
        return tasks

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        """The task's images for this batch (corrupted with the generator of seed, task and batch, or
        read from disk), predicted."""
        t0 = time.perf_counter()
        clean = x
        x, y = ctx.task.work.read(x, y, ctx)
        with eval_mode(model):
            gen = ctx.generator(_PREDICT_KEY) if is_randomized(model) else None
            pred = predict(model, x, gen)
        rows = [(ctx.start + i, int(lab), int(p), int(lab == p)) for i, (lab, p) in enumerate(zip(y.tolist(), pred.tolist()))]
        cost = {"seconds": time.perf_counter() - t0, "gradients": 0, "forwards": int(x.shape[0])}
        # the first image of every task, clean and corrupted, for the report's gallery
        examples = []
        if ctx.batch_index == 0 and len(rows):
            examples = [Example(ctx.start, int(y[0]), int(pred[0]), clean[0].cpu().numpy(), x[0].cpu().numpy())]
        return BatchOutput(rows, [cost], examples=examples)

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Errors per corruption and severity from the stored rows (finished or not), CE / mCE /
        relative mCE against the configured baseline, and the clean accuracy."""
        run_id, config = run["run_id"], run["config"]
        metric = CorruptionError()
        done: dict[str, int] = {}
        for t in run["tasks"]:
            rows = store.sample_rows(cls.sample_table, run_id, t["task"])
            metric.update(t["corruption"], t["severity"], (bool(r["correct"]) for r in rows))
            done[t["task"]] = len(rows)
        base = config.get("baseline")
        baseline = None
        if base:
            baseline = {c: {int(s): float(e) for s, e in per.items()} for c, per in base["errors"].items()}
        result = metric.compute(baseline)
        clean_n = done.get(CLEAN, 0)
        clean_acc = None if result["clean_error"] is None else 1 - result["clean_error"]
        per = []
        order = list(config.get("corruptions") or [])
        for c in sorted(result["mean_error"], key=lambda c: (order.index(c) if c in order else len(order), c)):
            per.append({
                "corruption": c, "errors": {str(s): e for s, e in result["errors"][c].items()},
                "mean_error": result["mean_error"][c], "ce": result.get("ce", {}).get(c),
                "relative_ce": result.get("relative_ce", {}).get(c),
            })
        costs = sum(sum(c["seconds"] for c in store.attack_costs(run_id, t["task"])) for t in run["tasks"])
        return {
            "model": config["model"], "dataset": config["dataset"], "split": config["split"], "n": config["n"],
            "protocol": cls.name,
            "clean_accuracy": clean_acc, "clean_error": result["clean_error"],
            "ci95": {"clean": wilson_interval(clean_acc, clean_n)},
            "corruption_accuracy": None if result["mean_corruption_error"] is None else 1 - result["mean_corruption_error"],
            "mean_corruption_error": result["mean_corruption_error"],
            "errors": {c: {str(s): e for s, e in per_s.items()} for c, per_s in result["errors"].items()},
            "per_corruption": per,
            "baseline": base["name"] if base else None,
            "mce": result.get("mce"), "relative_mce": result.get("relative_mce"),
            "tasks_done": done,
            "complete": all(done.get(t["task"], 0) >= t["n"] for t in run["tasks"]),
            "seconds": round(costs, 3),
        }

    # lower is better: mCE when the group has a baseline (its key includes it), else the mean error
    leaderboard_columns = ("-mce", "-mean_corruption_error", "clean_accuracy")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """Runs on the same data with the same corruption tasks and baseline compare; they rank by
        mCE when there is a baseline, else by the mean corruption error (lower is better)."""
        config = run["config"]
        base = (config.get("baseline") or {}).get("name")
        key = (run["dataset"], cls.name, tuple(config.get("tasks", ())), base)
        what = f"mCE vs {base}" if base else "mean corruption error"
        return key, f"{run['dataset']} · corruptions ({len(config.get('corruptions', ()))}) · {what}"

