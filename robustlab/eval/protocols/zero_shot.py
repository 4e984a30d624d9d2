"""The zero-shot protocol: clean and robust zero-shot accuracy of a vision-language model on many data
sets in one run, and their average.

The model is a :class:`~robustlab.vlm.VisionLanguageModel`; for each data set a zero-shot head
(:class:`~robustlab.vlm.ZeroShotClassifier`: the data set's class names x templates, text embeddings
computed once) makes it an ordinary classifier. Images are perturbed in [0, 1] at the data set's
resolution, before the model's own resize and normalization (image folders are first resized and
cropped to the model's input size by the data stream, as every image-folder evaluation is).

Tasks: ``<dataset>@<eps>`` for every data set and epsilon (one threat norm, several radii: Linf 1/255
and 4/255 by default); each runs the attack ensemble (AutoAttack's ``standard`` or PGD, as chosen)
on the points its head classifies correctly, with every claimed success re-verified, exactly as the
adversarial protocol's main task does. Each task reads its own data set and attacks its own head
(:meth:`ZeroShotProtocol.task_data` / :meth:`ZeroShotProtocol.task_model`); streaming sources (an
ImageNet validation folder) are decoded batch by batch. With sanity checks on, ``sanity:large-eps``
attacks the first data set's head in a ball that covers the box (accuracy must fall to ~0).

Per-sample rows go to ``zero_shot_samples``; the summary (from the store alone) gives per data set the
clean accuracy and the robust accuracy at each epsilon, and their averages over data sets
(:class:`~robustlab.eval.metrics.ZeroShotAccuracy`), which the leaderboard ranks by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.attacks.base import Attack, create_attack
from robustlab.attacks.ensemble import EnsembleState, WorstCaseEnsemble
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import ZeroShotAccuracy, wilson_interval
from robustlab.eval.protocols.adversarial import SAVE_SECONDS, AdversarialProtocol
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import Example, ResultsStore
from robustlab.eval.verify import verify_adversarial
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel
from robustlab.vlm.suite import ZeroShotSet

DEFAULT_EPS = (1 / 255, 4 / 255)
LARGE_EPS_SAMPLES = 50
EXAMPLES_PER_SET = 2  # broken examples kept per data set (at its largest epsilon) for the report


def eps_key(eps: float) -> str:
    """An epsilon as the summary names it: ``1/255`` for whole 255ths, else ``%g``."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-4 and round(k) > 0 else f"{eps:g}"


@dataclass
class _Work:
    """What one task runs: its data set (data and head) and the ensemble at its epsilon."""

    zset: ZeroShotSet
    ensemble: WorstCaseEnsemble
    keep: int = 0


class ZeroShotProtocol(Protocol):
    """Zero-shot clean and robust accuracy over ``sets`` at each epsilon of ``eps`` (``attacks``: the
    ensemble on one threat model; its norm is used, rebuilt at each epsilon)."""

    name = "zero-shot"
    sample_table = "zero_shot_samples"
    sample_columns: ClassVar[tuple[tuple[str, str], ...]] = (
        ("dataset", "TEXT NOT NULL"), ("label", "INTEGER NOT NULL"), ("clean_pred", "INTEGER NOT NULL"),
        ("clean_correct", "INTEGER NOT NULL"), ("robust", "INTEGER NOT NULL"), ("broken_by", "INTEGER"),
        ("adv_pred", "INTEGER"), ("distance", "REAL"),
    )

    def __init__(self, sets: list[ZeroShotSet], attacks: list[Attack], eps: tuple[float, ...] = DEFAULT_EPS,
                 sanity_checks: bool = True, vlm_info: dict[str, Any] | None = None) -> None:
        if not sets:
            raise RobustlabError("a zero-shot evaluation needs at least one data set")
        if not attacks:
            raise RobustlabError("give at least one attack")
        self.sets = list(sets)
        self.threat: ThreatModel = WorstCaseEnsemble(attacks).threat
        self.eps = tuple(dict.fromkeys(float(e) for e in eps))
        if not self.eps or any(e <= 0 for e in self.eps):
            raise RobustlabError(f"epsilons must be > 0, got {', '.join(f'{e:g}' for e in eps) or 'none'}")
        self.attacks = {e: [a.with_threat(self.threat.with_eps(e)) for a in attacks] for e in self.eps}
        self.sanity = sanity_checks
        self.vlm_info = dict(vlm_info or {})
        self.tasks: list[Task] = []

    @property
    def suite_name(self) -> str:
        """The run's data set name: ``zero-shot:a+b+c``."""
        return "zero-shot:" + "+".join(s.key for s in self.sets)

    # ------------------------------------------------------------------ configuration and plan

    def config(self) -> dict[str, Any]:
        first = self.attacks[self.eps[0]]
        return {
            "dataset": self.suite_name, "split": self.sets[0].data.split, "n": sum(len(s.data) for s in self.sets),
            "vlm": {k: v for k, v in self.vlm_info.items() if k in ("spec", "source", "weights_sha256")},
            "norm": self.threat.norm, "eps": list(self.eps), "attacks": [a.config() for a in first],
            "datasets": [s.describe() for s in self.sets], "sanity": self.sanity,
        }

    def attack_records(self) -> list[dict[str, Any]]:
        return [{**a.config(), "targeted": a.targeted, "minimum_norm": a.minimum_norm} for a in self.attacks[self.eps[0]]]

    def plan(self, n: int, image_dim: int) -> list[Task]:
        tasks = []
        for s in self.sets:
            for i, e in enumerate(self.eps):
                keep = EXAMPLES_PER_SET if i == len(self.eps) - 1 else 0
                tasks.append(Task(f"{s.key}@{eps_key(e)}", "zero-shot", len(s.data), {"dataset": s.key, "eps": e},
                                  _Work(s, WorstCaseEnsemble(self.attacks[e]), keep)))
        if self.sanity:
            s = self.sets[0]
            dim = int(torch.tensor(s.data.image_shape).prod())
            big = self.threat.with_eps(sanity.large_eps(self.threat, dim))
            tasks.append(Task("sanity:large-eps", "sanity", min(len(s.data), LARGE_EPS_SAMPLES),
                              {"dataset": s.key, "eps": big.eps},
                              _Work(s, WorstCaseEnsemble([create_attack("pgd", big, steps=20)]))))
        self.tasks = tasks
        return tasks

    def task_data(self, task: Task, data: Dataset) -> Dataset:
        return task.work.zset.data

    def task_model(self, task: Task, model: nn.Module) -> nn.Module:
        return task.work.zset.head

    # ------------------------------------------------------------------ one batch

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        """The task's ensemble on one batch of its data set, against its head: per-sample rows,
        per-attack costs, rejected claims, a few broken examples."""
        work: _Work = ctx.task.work
        ensemble = work.ensemble
        if ctx.saved is not None:
            state = EnsembleState.from_bytes(ctx.saved, x)
        else:
            with eval_mode(model), torch.no_grad():
                clean_pred = model(x).argmax(dim=1)
            state = EnsembleState.start(x, y, clean_pred)

        def check(m: nn.Module, xs: torch.Tensor, x_adv: torch.Tensor, ys: torch.Tensor):
            return verify_adversarial(model, xs, x_adv, ys, ensemble.threat, None)

        save = (lambda s: ctx.save(s.to_bytes(work.keep))) if ctx.save is not None else None
        ensemble.run_state(model, x, y, state, ctx.generator, check, ctx.status, save, SAVE_SECONDS)
        s = state
        key = work.zset.key
        rows = []
        for i, (lab, cp, ok, rb, bb, ap, d) in enumerate(zip(
                y.tolist(), s.clean_pred.tolist(), s.correct.tolist(), s.robust.tolist(), s.broken_by.tolist(),
                s.adv_pred.tolist(), s.distance.tolist())):
            rows.append((ctx.start + i, key, lab, cp, int(ok), int(rb), bb if bb >= 0 else None,
                         ap if ap >= 0 else None, d if bb >= 0 else None))
        examples = [Example(ctx.start + i, int(y[i]), int(s.adv_pred[i]), x[i].cpu().numpy(), s.x_adv[i].cpu().numpy())
                    for i in (s.broken_by >= 0).nonzero(as_tuple=True)[0].tolist()[:work.keep]]
        return BatchOutput(rows, s.costs, s.rejected, examples)

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        checks = sanity.mode_verdicts(info)
        if self.sanity:
            checks.append(sanity.gradient_verdict(model, probe_x, probe_y))
        return checks

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Per data set: n, clean accuracy, robust accuracy per epsilon; their averages over data sets
        (the headline ``robust_accuracy`` is the average at the first epsilon)."""
        run_id, config = run["run_id"], run["config"]
        eps = [float(e) for e in config["eps"]]
        keys = [eps_key(e) for e in eps]
        metrics = {k: ZeroShotAccuracy() for k in keys}
        done: dict[str, int] = {}
        wanted: dict[str, int] = {}
        for t in run["tasks"]:
            rows = store.sample_rows(cls.sample_table, run_id, t["task"])
            done[t["task"]], wanted[t["task"]] = len(rows), t["n"]
            if t["kind"] == "sanity":
                if checks is not None and len(rows) >= t["n"]:
                    attacked = sum(r["clean_correct"] for r in rows)
                    checks.append(sanity.large_eps_verdict(sum(r["robust"] for r in rows), attacked, t["eps"]))
                continue
            metrics[eps_key(float(t["eps"]))].update(t["dataset"], (bool(r["clean_correct"]) for r in rows),
                                                     (bool(r["robust"]) for r in rows))
        computed = {k: m.compute() for k, m in metrics.items()}
        first = computed[keys[0]]
        per = []
        for d in config["datasets"]:
            name = d["dataset"]
            cell = first["datasets"].get(name)
            n = cell["n"] if cell else 0
            clean = cell["clean_accuracy"] if cell else None
            per.append({
                "dataset": name, "n": n, "of": d["n"], "classes": len(d["classnames"]),
                "templates": len(d["templates"]), "clean_accuracy": clean,
                "robust_accuracy": {k: (computed[k]["datasets"].get(name) or {}).get("robust_accuracy") for k in keys},
                "ci95": {"clean": wilson_interval(clean, n)},
            })
        avg_robust = {k: computed[k]["average"]["robust_accuracy"] for k in keys}
        costs = sum(c["seconds"] for t in run["tasks"] for c in store.attack_costs(run_id, t["task"]))
        zs = [t for t in run["tasks"] if t["kind"] != "sanity"]
        summary = {
            "run_id": run_id, "protocol": cls.name, "model": run["model"], "dataset": run["dataset"],
            "split": run["split"], "n": sum(p["n"] for p in per),
            "threat": {"norm": config["norm"], "eps": eps[0]}, "eps": eps,
            "attacks": [{"name": a["name"], "params": dict(a["params"])} for a in config["attacks"]],
            "datasets": per,
            "clean_accuracy": first["average"]["clean_accuracy"], "robust_accuracy": avg_robust[keys[0]],
            "average_clean_accuracy": first["average"]["clean_accuracy"], "average_robust_accuracy": avg_robust,
            "tasks_done": done,
            "complete": all(done[t["task"]] >= wanted[t["task"]] for t in zs),
            "seconds": round(costs, 3),
        }
        rejected = sum(b["rejected"] for b in store.batch_stats(run_id).values())
        summary["rejected"] = rejected
        if checks is not None:
            checks.append(sanity.verdict("verification", "warn" if rejected else "pass",
                                         f"{rejected} claimed adversarial examples failed re-verification and were not "
                                         "counted" if rejected else "every counted adversarial example was re-verified"))
        if not summary["complete"]:
            summary["partial"] = True
        return summary

    leaderboard_columns = ("average_robust_accuracy", "average_clean_accuracy")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """Runs compare when they saw the same data sets (in the same order, at the same image size: the
        resolution the perturbation lives at; the same image-folder files) through the same class names
        and templates, at the same norm and epsilons. They rank by the average robust accuracy at the
        first epsilon, then the next ones."""
        config = run["config"]
        eps = tuple(round(float(e), 8) for e in config["eps"])
        sets = config.get("datasets", [])
        same = [[d["dataset"], d.get("image_shape"), d.get("data_fingerprint"), d["classnames"], d["templates"]]
                for d in sets]
        digest = hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]
        names = ", ".join(d["dataset"] for d in sets)
        title = (f"zero-shot · {names} · {config['norm']} ε = {', '.join(eps_key(float(e)) for e in config['eps'])} · "
                 f"prompts and sizes {digest}")
        return (run["dataset"], cls.name, config["norm"], eps, digest), title

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """As the adversarial protocol: a full evaluation runs at least the standard ensemble."""
        config = run["config"]
        return AdversarialProtocol.leaderboard_strength({**run, "config": {**config, "eps": config["eps"][0]}})
