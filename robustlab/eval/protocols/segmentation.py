"""The segmentation protocol: pixel accuracy and mean IoU of a segmentation model, clean and under
attacks on the per-pixel loss, per sample in the store.

A segmentation model maps images (N, C, H, W) to per-pixel logits (N, classes, H, W); the data set
has per-pixel labels (:class:`~robustlab.data.dense.DenseDataset`). Every sample is attacked (there
is no "correctly classified" to start from) by each attack of the list, which maximizes the per-pixel
loss averaged over all pixels (:func:`robustlab.losses.per_sample`); an attack's image is kept
when it is finite, in [0, 1] and inside the threat model's ball (re-checked here: an image outside
counts as the clean one and as a rejected claim). Success is not a misclassification: per sample the
worst case over the attacks is the adversarial image with the fewest correctly labelled pixels, and
the protocol records its pixel accuracy and per-class intersection / union counts beside the clean
ones (``segmentation_samples``). The summary feeds :class:`~robustlab.eval.metrics.SegmentationScore`:
pixel accuracy and mIoU, clean and robust, per class IoU, and the same at each epsilon of the grid.

Tasks: ``main`` (the attacks at the threat model's epsilon) and ``eps=E`` (each other epsilon of the
grid). Randomness: attack i of a batch draws from ``ctx.generator(i)``, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.attacks.base import ATTACKS, Attack
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import SegmentationScore, confusion_counts
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import ResultsStore
from robustlab.eval.verify import TOLERANCE
from robustlab.models.runtime import eval_mode
from robustlab.predictor import is_randomized, predict
from robustlab.threat import ThreatModel

_PREDICT_KEY = 0x5E6  # generator key of a randomized model's prediction draws
VIEWS = ("clean", "adversarial")


def dense_attacks() -> list[str]:
    """Names of the attacks that attack segmentation models."""
    return [n for n in ATTACKS.names() if ATTACKS.get(n).dense]


class SegmentationProtocol(Protocol):
    """Pixel accuracy and mIoU, clean and under ``attacks`` (each at the threat model's epsilon and at
    every epsilon of ``eps_grid``), for a model with ``num_classes`` per-pixel classes."""

    name = "segmentation"
    sample_table = "segmentation_samples"
    dense = True
    sample_columns: ClassVar[tuple[tuple[str, str], ...]] = (
        ("pixels", "INTEGER NOT NULL"),
        ("clean_correct", "INTEGER NOT NULL"),   # correctly labelled pixels
        ("clean_inter", "TEXT NOT NULL"),        # JSON list per class: pixels predicted c and labelled c
        ("clean_union", "TEXT NOT NULL"),        # JSON list per class: pixels predicted c or labelled c
        ("adv_correct", "INTEGER NOT NULL"),     # the same for the worst adversarial image
        ("adv_inter", "TEXT NOT NULL"),
        ("adv_union", "TEXT NOT NULL"),
        ("worst_attack", "INTEGER"),             # index of the attack that gave it (NULL: none lowered it)
        ("distance", "REAL"),                    # its perturbation norm
        ("gradients", "INTEGER NOT NULL"),
        ("forwards", "INTEGER NOT NULL"),
    )

    def __init__(self, attacks: list[Attack], num_classes: int, eps_grid: tuple[float, ...] = (),
                 classes: list[str] | None = None, defenses: list[dict[str, Any]] | None = None) -> None:
        """``attacks``: one threat model, untargeted, each able to attack dense outputs (made adaptive
        to ``defenses`` by the caller, :func:`robustlab.eval.runner.segment`); ``classes``: names
        recorded with the run (background first); ``defenses``: the configs of the defenses in front of
        the model, recorded."""
        if not attacks:
            raise RobustlabError("give at least one attack")
        not_dense = [a.name for a in attacks if not a.dense]
        if not_dense:
            raise RobustlabError(f"attack(s) {', '.join(not_dense)} do not attack segmentation models; use "
                                 f"{', '.join(dense_attacks())}")
        threats = {(a.threat.norm, a.threat.eps) for a in attacks}
        if len(threats) > 1:
            raise RobustlabError("every attack of a segmentation run needs the same threat model (norm and eps)")
        if any(a.targeted for a in attacks):
            raise RobustlabError("the segmentation protocol runs untargeted attacks (they maximize the per-pixel loss)")
        if num_classes < 2:
            raise RobustlabError(f"a segmentation model needs at least 2 classes, got {num_classes}")
        self.attacks = list(attacks)
        self.threat: ThreatModel = attacks[0].threat
        self.num_classes = int(num_classes)
        self.eps_grid = tuple(sorted({float(e) for e in eps_grid}))
        self.classes = list(classes) if classes else None
        self.defenses = list(defenses or [])

    def config(self) -> dict[str, Any]:
        config = {"norm": self.threat.norm, "eps": self.threat.eps, "attacks": [a.config() for a in self.attacks],
                  "eps_grid": list(self.eps_grid), "num_classes": self.num_classes}
        if self.classes:
            config["classes"] = self.classes
        if self.defenses:
            config["defenses"] = self.defenses
        return config

    def attack_records(self) -> list[dict[str, Any]]:
        return [{**a.config(), "targeted": a.targeted, "minimum_norm": a.minimum_norm} for a in self.attacks]

    def plan(self, n: int, image_dim: int) -> list[Task]:
        tasks = [Task("main", "main", n, {"eps": self.threat.eps}, self.attacks)]
        for eps in self.eps_grid:
            if eps != self.threat.eps:
                t = self.threat.with_eps(eps)
                tasks.append(Task(f"eps={eps:g}", "eps", n, {"eps": eps}, [a.with_threat(t) for a in self.attacks]))
        return tasks

    # ------------------------------------------------------------------ one batch

    def _predict(self, model: nn.Module, x: torch.Tensor, ctx: BatchContext, key: int) -> torch.Tensor:
        gen = ctx.generator(_PREDICT_KEY, key) if is_randomized(model) else None
        with eval_mode(model):
            return predict(model, x, gen, dense=True)

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        """Clean prediction, then each attack on every sample; per sample the attack image with the
        fewest correct pixels (after checking it lies in the ball and the box) is the worst case."""
        n = x.shape[0]
        clean_pred = self._predict(model, x, ctx, 0)
        clean_correct, clean_inter, clean_union = confusion_counts(clean_pred, y, self.num_classes)
        worst_pred = clean_pred.clone()
        worst_correct = torch.tensor(clean_correct, device=x.device)
        worst_attack = torch.full((n,), -1, dtype=torch.long, device=x.device)
        distance = torch.zeros(n, device=x.device)
        gradients = torch.zeros(n, dtype=torch.long, device=x.device)
        forwards = torch.zeros(n, dtype=torch.long, device=x.device)
        costs, rejected = [], 0
        for i, attack in enumerate(ctx.task.work):
            t0 = time.perf_counter()
            if ctx.status is not None:
                ctx.status(attack.name, n)
            result = attack.run(model, x, y, ctx.generator(i))
            x_adv = result.x_adv
            ok = attack.threat.contains(x_adv, x, tol=TOLERANCE)  # finite, in [0, 1] and in the ball
            rejected += int((~ok).sum())
            x_adv = torch.where(ok.view(-1, 1, 1, 1), x_adv, x)  # a rejected claim counts as the clean image
            pred = self._predict(model, x_adv, ctx, i + 1)
            correct = (pred == y).flatten(1).sum(dim=1)
            worse = correct < worst_correct
            worst_correct = torch.where(worse, correct, worst_correct)
            worst_pred[worse] = pred[worse]
            worst_attack = torch.where(worse, torch.full_like(worst_attack, i), worst_attack)
            distance = torch.where(worse, attack.threat.distance(x_adv, x), distance)
            gradients += result.gradients.to(gradients.device)
            forwards += result.forwards.to(forwards.device) + 1
            costs.append({"seconds": time.perf_counter() - t0, "gradients": int(result.gradients.sum()),
                          "forwards": int(result.forwards.sum()) + n})
        adv_correct, adv_inter, adv_union = confusion_counts(worst_pred, y, self.num_classes)
        pixels = int(y[0].numel())
        rows = [
            (ctx.start + k, pixels, clean_correct[k], json.dumps(clean_inter[k]), json.dumps(clean_union[k]),
             adv_correct[k], json.dumps(adv_inter[k]), json.dumps(adv_union[k]),
             None if int(worst_attack[k]) < 0 else int(worst_attack[k]),
             None if int(worst_attack[k]) < 0 else float(distance[k]), int(gradients[k]), int(forwards[k]))
            for k in range(n)
        ]
        return BatchOutput(rows, costs, rejected)

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def task_score(cls, store: ResultsStore, run_id: str, task: str, num_classes: int) -> tuple[SegmentationScore, list[Any]]:
        """The metric of one task's stored rows (clean and adversarial views), and the rows."""
        rows = store.sample_rows(cls.sample_table, run_id, task)
        metric = SegmentationScore(num_classes)
        for view, prefix in zip(VIEWS, ("clean", "adv")):
            metric.update(view, [r["pixels"] for r in rows], [r[f"{prefix}_correct"] for r in rows],
                          [json.loads(r[f"{prefix}_inter"]) for r in rows], [json.loads(r[f"{prefix}_union"]) for r in rows])
        return metric, rows

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Pixel accuracy and mIoU, clean and robust (worst case over the attacks per sample), IoU per
        class, the epsilon curve and per attack how many samples it gave the worst case, from the
        stored rows (finished or not)."""
        run_id, config = run["run_id"], run["config"]
        k = int(config["num_classes"])
        metric, main = cls.task_score(store, run_id, "main", k)
        numbers = metric.compute()
        clean, adv = numbers.get("clean", {}), numbers.get("adversarial", {})
        attacks = config.get("attacks") or []
        costs = store.attack_costs(run_id, "main")
        per_attack = []
        for i, a in enumerate(attacks):
            cost = costs[i] if i < len(costs) else {"seconds": 0.0, "gradients": 0, "forwards": 0}
            per_attack.append({"index": i, "name": a["name"], "params": dict(a["params"]),
                               "worst_for": sum(1 for r in main if r["worst_attack"] == i),
                               "seconds": round(cost["seconds"], 4), "gradients": int(cost["gradients"]),
                               "forwards": int(cost["forwards"])})
        curve = []
        if main and len(main) >= next((t["n"] for t in run["tasks"] if t["task"] == "main"), 0):
            curve += [{"eps": 0.0, "mean_iou": clean.get("mean_iou"), "pixel_accuracy": clean.get("pixel_accuracy")},
                      {"eps": float(config["eps"]), "mean_iou": adv.get("mean_iou"),
                       "pixel_accuracy": adv.get("pixel_accuracy")}]
        for t in run["tasks"]:
            if t["kind"] != "eps":
                continue
            m, rows = cls.task_score(store, run_id, t["task"], k)
            if len(rows) >= t["n"]:
                v = m.compute()["adversarial"]
                curve.append({"eps": t["eps"], "mean_iou": v["mean_iou"], "pixel_accuracy": v["pixel_accuracy"]})
        curve.sort(key=lambda p: p["eps"])
        batches = store.batch_stats(run_id)
        rejected = sum(b["rejected"] for b in batches.values())
        if checks is not None:
            checks.append(sanity.verdict("verification", "warn" if rejected else "pass",
                                         f"{rejected} attack images outside the threat model or [0, 1] were replaced by "
                                         "the clean image" if rejected else
                                         "every attack image was re-checked: inside the ball and in [0, 1]"))
            if clean.get("mean_iou") is not None and adv.get("mean_iou") is not None:
                drop = clean["mean_iou"] - adv["mean_iou"]
                checks.append(sanity.verdict("attack-effect", "pass" if drop > 0 or config["eps"] == 0 else "warn",
                                             f"the attacks lowered mIoU by {100 * drop:.2f} points" if drop > 0 else
                                             "the attacks did not lower mIoU at all: check that the model's gradients "
                                             "reach its input (masked gradients?)"))
        summary = {
            "run_id": run_id, "protocol": cls.name, "model": run["model"], "dataset": run["dataset"],
            "split": run["split"], "n": len(main), "threat": {"norm": config["norm"], "eps": config["eps"]},
            "num_classes": k, "classes": config.get("classes"),
            "clean_miou": clean.get("mean_iou"), "robust_miou": adv.get("mean_iou"),
            "clean_pixel_accuracy": clean.get("pixel_accuracy"), "robust_pixel_accuracy": adv.get("pixel_accuracy"),
            # the generic names (RunResult, tables that show accuracies): pixel accuracies
            "clean_accuracy": clean.get("pixel_accuracy"), "robust_accuracy": adv.get("pixel_accuracy"),
            "clean_iou": clean.get("iou"), "robust_iou": adv.get("iou"),
            "attacks": per_attack, "eps_curve": curve, "rejected": rejected, "defenses": config.get("defenses", []),
            "seconds": round(sum(c["seconds"] for t in run["tasks"] for c in store.attack_costs(run_id, t["task"])), 4),
        }
        if run.get("status") != "complete":
            summary.update(done=len(main), partial=True)
        return summary

    leaderboard_columns = ("robust_miou", "clean_miou", "robust_pixel_accuracy", "clean_pixel_accuracy")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """Runs on the same data at the same threat model compare; they rank by robust mIoU."""
        config = run["config"]
        eps = float(config["eps"])
        key = (run["dataset"], cls.name, config["norm"], round(eps, 8))
        return key, f"{run['dataset']} · segmentation · {config['norm']} eps={eps:g} · robust mIoU"

