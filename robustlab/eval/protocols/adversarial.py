"""The adversarial protocol: clean accuracy, a worst-case attack ensemble on still-robust points with
every claimed success re-verified, robustness curves over epsilons and attack strength, and the
gradient-masking sanity checks.

Tasks: ``main`` (the ensemble at the threat model's epsilon), ``eps=E`` (the ensemble at each other
epsilon of the grid), ``steps=S`` / ``queries=Q`` (the first attack with a strength parameter at
other strengths), ``sanity:large-eps`` (PGD in a ball that covers the box). Per-sample rows go to
``adversarial_samples``.

With ``reuse`` on, a curve point at epsilon E counts as broken, without attacking it again, every
sample broken inside a smaller ball of the same norm (the main task and smaller grid points, as far
as they are done), and an ensemble of minimum-norm attacks gives the whole curve from the main
task's per-sample minimal norms. It is off by default: with it off, runs are those of the release
before this protocol existed, sample for sample.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS
from robustlab.attacks.base import Attack, create_attack
from robustlab.attacks.ensemble import EnsembleState, WorstCaseEnsemble
from robustlab.attacks.suites import SUITES
from robustlab.eval import sanity
from robustlab.eval.binarization import binarization_test
from robustlab.eval.metrics import RobustAccuracy
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import Example, ResultsStore, SampleRow
from robustlab.eval.verify import verify_adversarial
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode
from robustlab.predictor import predict
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel

LARGE_EPS_SAMPLES = 200
BINARIZATION_SAMPLES = 10
STRENGTH_PARAMS = ("steps", "queries")
# Parameters that make an attack stronger as they grow (compared against the reference ensemble).
STRENGTH_KEYS = ("steps", "queries", "restarts", "eot", "n_target_classes")
# Save a batch's state after an attack once this many seconds have passed since the batch began or
# was last saved (quick batches are never saved half-done: redoing them costs less than the writes).
SAVE_SECONDS = 60.0
_CLEAN_KEY = 0xC1EA  # generator key of the clean prediction (attacks use their index)
NON_ADAPTIVE = ("non-adaptive", "transfer")  # task kinds of a defended model's non-adaptive attacks


def default_steps_grid(steps: int) -> tuple[int, ...]:
    """Strengths for the attack-strength curve around an attack's own: up to twice as strong."""
    return tuple(sorted({max(1, steps // 10), max(1, steps // 2), steps, 2 * steps}))


def strength_attack(attacks: list[Any]) -> tuple[Any, str] | tuple[None, None]:
    """The first attack with a strength parameter (iterations for white-box, queries for black-box);
    attacks or their configs (dicts with "params")."""
    for a in attacks:
        params = a["params"] if isinstance(a, dict) else a.params
        for param in STRENGTH_PARAMS:
            if param in params:
                return a, param
    return None, None


@dataclass
class AdversarialOptions:
    """What, besides the attacks, determines an adversarial run's numbers."""

    eps_grid: tuple[float, ...] = ()
    steps_grid: tuple[int, ...] | None = None  # None: derived from the first iterative attack; (): none
    sanity: bool = True
    reuse: bool = False


class AdversarialProtocol(Protocol):
    name = "adversarial"
    sample_table = "adversarial_samples"

    def __init__(self, attacks: list[Attack], options: AdversarialOptions | None = None,
                 defenses: list[dict[str, Any]] | None = None, naive_attacks: list[Attack] | None = None,
                 transfer: bool = True) -> None:
        """``attacks``: the ensemble (made adaptive to ``defenses`` by the caller); ``naive_attacks``
        (defended models): the attacks as given, run as if the model were undefended (the
        ``non-adaptive`` task) and, with ``transfer`` (the base model takes the images as they are:
        no encoding in front), on the undefended base model, checked on the defended one
        (``transfer``)."""
        self.ensemble = WorstCaseEnsemble(attacks)  # checks one threat model, untargeted
        self.attacks = self.ensemble.attacks
        self.threat: ThreatModel = self.ensemble.threat
        self.options = options or AdversarialOptions()
        self.defenses = list(defenses or [])
        self.naive_attacks = list(naive_attacks or []) if self.defenses else []
        self.transfer = transfer
        self.tasks: list[Task] = []

    # ------------------------------------------------------------------ configuration and plan

    def config(self) -> dict[str, Any]:
        o = self.options
        config = {
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "attacks": [a.config() for a in self.attacks],
            "eps_grid": sorted(set(float(e) for e in o.eps_grid)),
            "steps_grid": [t.params["steps"] for t in self.tasks if t.kind == "steps"],
            "sanity": o.sanity,
        }
        # Keys that only appear when used keep the configuration (and its hash) of earlier runs.
        if self.defenses:
            config["defenses"] = self.defenses
        if self.naive_attacks:
            config["non_adaptive"] = [a.config() for a in self.naive_attacks]
        if o.reuse:
            config["reuse"] = True
        return config

    def attack_records(self) -> list[dict[str, Any]]:
        return [{**a.config(), "targeted": a.targeted, "minimum_norm": a.minimum_norm} for a in self.attacks]

    def plan(self, n: int, image_dim: int) -> list[Task]:
        """The main ensemble, the epsilon curve, the steps curve and the large-epsilon check."""
        threat, attacks, o = self.threat, self.attacks, self.options

        def task(name: str, kind: str, t: ThreatModel, members: list[Attack], size: int, steps: int | None = None) -> Task:
            return Task(name, kind, size, {"eps": t.eps, "steps": steps}, WorstCaseEnsemble(members))

        tasks = [task("main", "main", threat, attacks, n)]
        if self.naive_attacks:  # what the defense's authors would have measured, beside the adaptive number
            for name, view in (("non-adaptive", "naive"), ("transfer", "base"))[:2 if self.transfer else 1]:
                tasks.append(Task(name, name, n, {"eps": threat.eps, "steps": None, "view": view},
                                  WorstCaseEnsemble(self.naive_attacks)))
        for eps in sorted(set(float(e) for e in o.eps_grid)):
            if eps != threat.eps:
                t = threat.with_eps(eps)
                tasks.append(task(f"eps={eps:g}", "eps", t, [a.with_threat(t) for a in attacks], n))
        iterative, param = strength_attack(attacks)
        grid = o.steps_grid
        if grid is None:
            grid = default_steps_grid(iterative.params[param]) if iterative else ()
        if grid and iterative is None:
            raise RobustlabError("a steps grid needs an attack with a 'steps' or 'queries' parameter")
        for steps in sorted(set(int(s) for s in grid)):
            if steps < 1:
                raise RobustlabError(f"{param} in the steps grid must be >= 1, got {steps}")
            if len(attacks) == 1 and steps == iterative.params[param]:
                continue  # the main task is this point already
            tasks.append(task(f"{param}={steps}", "steps", threat, [iterative.with_params(**{param: steps})], n, steps))
        if o.sanity:
            big = threat.with_eps(sanity.large_eps(threat, image_dim))
            tasks.append(task("sanity:large-eps", "sanity", big, [create_attack("pgd", big, steps=20)],
                              min(n, LARGE_EPS_SAMPLES)))
        self.tasks = tasks
        return tasks

    # ------------------------------------------------------------------ one batch

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        """Run one task's ensemble on one batch: per-sample rows, per-attack costs, the number of
        claimed successes that failed verification, and up to ``ctx.keep_examples`` broken examples."""
        task, ensemble = ctx.task, ctx.task.work
        if ctx.saved is not None:
            state = EnsembleState.from_bytes(ctx.saved, x)
        else:
            with eval_mode(model):
                clean_pred = predict(model, x, ctx.generator(_CLEAN_KEY) if _randomized(model) else None)
            state = EnsembleState.start(x, y, clean_pred)
            if self.options.reuse and task.kind == "eps":
                self._reuse(state, ctx)
        threat = ensemble.threat
        view = task.params.get("view")
        attacked = model.naive() if view == "naive" else model.model if view == "base" else model

        def check(m: nn.Module, xs: torch.Tensor, x_adv: torch.Tensor, ys: torch.Tensor):
            # claims are verified on the (defended) model under evaluation, whatever the attack saw
            gen = ctx.generator(state.attacks_done, 1) if _randomized(model) else None
            return verify_adversarial(model, xs, x_adv, ys, threat, gen)

        keep = ctx.keep_examples
        save = (lambda s: ctx.save(s.to_bytes(keep))) if ctx.save is not None else None
        if not (self.options.reuse and task.kind == "eps" and _all_minimum_norm(ensemble.attacks)):
            ensemble.run_state(attacked, x, y, state, ctx.generator, check, ctx.status, save, SAVE_SECONDS)
        else:  # the curve from the main task's minimal norms: nothing to attack
            state.costs = [{"seconds": 0.0, "gradients": 0, "forwards": 0} for _ in ensemble.attacks]
            state.attacks_done = len(ensemble.attacks)
        s = state
        rows = []
        for i, (lab, cp, ok, rb, bb, ap, d, g, f, md) in enumerate(
            zip(
                y.tolist(), s.clean_pred.tolist(), s.correct.tolist(), s.robust.tolist(), s.broken_by.tolist(),
                s.adv_pred.tolist(), s.distance.tolist(), s.gradients.tolist(), s.forwards.tolist(),
                s.min_distance.tolist(),
            )
        ):
            rows.append(
                SampleRow(ctx.start + i, lab, cp, ok, rb, bb if bb >= 0 else None, ap if ap >= 0 else None,
                          d if bb >= 0 else None, g, f, md if md != float("inf") else None)
            )
        examples = []
        for i in (s.broken_by >= 0).nonzero(as_tuple=True)[0].tolist()[:keep]:
            examples.append(
                Example(ctx.start + i, int(y[i]), int(s.adv_pred[i]), x[i].cpu().numpy(), s.x_adv[i].cpu().numpy())
            )
        return BatchOutput(rows, s.costs, s.rejected, examples)

    def _reuse(self, state: EnsembleState, ctx: BatchContext) -> None:
        """Mark as broken what a smaller ball of the same norm already broke (the main task and the
        grid points done before this one), and, for an ensemble of minimum-norm attacks, what the
        main task's minimal norms break at this epsilon."""
        if ctx.done_rows is None:
            return
        eps = ctx.task.params["eps"]
        minimum_norm = _all_minimum_norm(ctx.task.work.attacks)
        sources = [t for t in self.tasks if t.kind in ("main", "eps") and t.name != ctx.task.name
                   and (t.params["eps"] <= eps or (minimum_norm and t.kind == "main"))]
        for t in sources:
            for r in ctx.done_rows(t.name):
                i = r["sample_index"] - ctx.start
                if not state.robust[i]:
                    continue
                if r["broken_by"] is not None and r["distance"] is not None and r["distance"] <= eps:
                    d, by, pred = r["distance"], r["broken_by"], r["adv_pred"]
                elif minimum_norm and t.kind == "main" and r["min_distance"] is not None and r["min_distance"] <= eps:
                    d, by, pred = r["min_distance"], 0, r["adv_pred"]
                else:
                    continue
                state.robust[i] = False
                state.broken_by[i] = by
                state.adv_pred[i] = -1 if pred is None else pred
                state.distance[i] = d

    # ------------------------------------------------------------------ live checks at the end

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        checks = sanity.mode_verdicts(info)
        if self.options.sanity:
            checks.append(sanity.gradient_verdict(model, probe_x, probe_y))
            if self.naive_attacks:  # the non-adaptive attacker's gradients: masked ones are flagged here
                verdict = sanity.gradient_verdict(model.naive(), probe_x, probe_y)
                checks.append({**verdict, "name": "non-adaptive gradients"})
            checks.append(run_binarization(model, self.attacks, probe_x, probe_y, seed, device))
        return checks

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def normalize_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Attack parameters added since a run was stored take their defaults (which keep the old
        behaviour), so a run of an earlier release resumes."""
        attacks = []
        for a in config.get("attacks", []):
            if a.get("name") in ATTACKS:
                a = {**a, "params": {**ATTACKS.get(a["name"]).defaults, **a["params"]}}
            attacks.append(a)
        return {**config, "attacks": attacks}

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """The run's summary from the store alone (finished or not); with ``checks``, append the
        verdicts that the stored curves give (steps, large-eps, black-box, verification)."""
        run_id, config = run["run_id"], run["config"]
        attacks = config.get("attacks") or run["attacks"]
        minimum_norm = {a["index"]: a.get("minimum_norm") for a in run.get("attacks", [])}
        threat = {"norm": config["norm"], "eps": config["eps"]}
        batches = store.batch_stats(run_id)
        main = store.samples(run_id, "main")
        metric = RobustAccuracy().update([r.clean_correct for r in main], [r.robust for r in main],
                                         [r.broken_by for r in main])
        n = metric.n
        costs = store.attack_costs(run_id, "main")
        per_attack = []
        for i, (a, (broken, after)) in enumerate(zip(attacks, metric.after_each(len(attacks)))):
            cost = costs[i] if i < len(costs) else {"seconds": 0.0, "gradients": 0, "forwards": 0}
            per_attack.append({
                "index": i, "name": a["name"], "kind": a.get("kind", "white-box"), "params": dict(a["params"]),
                "robust_accuracy": after, "broken": broken, "seconds": round(cost["seconds"], 4),
                "gradients": int(cost["gradients"]), "forwards": int(cost["forwards"]),
            })
        done = {t["task"]: t for t in run["tasks"]}
        partial = run.get("status") != "complete"

        def accuracy(task: dict[str, Any]) -> float | None:
            rows = store.samples(run_id, task["task"])
            if len(rows) < task["n"]:  # unfinished curve points are left out
                return None
            return RobustAccuracy().update([r.clean_correct for r in rows], [r.robust for r in rows],
                                           [r.broken_by for r in rows]).compute()["robust_accuracy"]

        curve_tasks = {t["task"]: accuracy(t) for t in run["tasks"] if t["kind"] in ("eps", "steps", "sanity")}
        main_task = done.get("main")
        main_done = n > 0 and (main_task is None or n >= main_task["n"])
        eps_curve = [{"eps": 0.0, "robust_accuracy": metric.compute()["clean_accuracy"]},
                     {"eps": threat["eps"], "robust_accuracy": metric.compute()["robust_accuracy"]}] if main_done else []
        eps_curve += [{"eps": t["eps"], "robust_accuracy": curve_tasks[t["task"]]} for t in run["tasks"]
                      if t["kind"] == "eps" and curve_tasks[t["task"]] is not None]
        eps_curve = sorted({p["eps"]: p for p in eps_curve}.values(), key=lambda p: p["eps"])
        steps_curve = None
        steps_tasks = [t for t in run["tasks"] if t["kind"] == "steps" and curve_tasks[t["task"]] is not None]
        iterative, param = strength_attack(attacks)
        if steps_tasks and main_done:
            points = [{"steps": t["steps"], "robust_accuracy": curve_tasks[t["task"]]} for t in steps_tasks]
            if len(attacks) == 1:
                points.append({"steps": iterative["params"][param], "robust_accuracy": metric.compute()["robust_accuracy"]})
            points = sorted({p["steps"]: p for p in points}.values(), key=lambda p: p["steps"])
            steps_curve = {"attack": iterative["name"], "param": param, "kind": iterative.get("kind", "white-box"),
                           "eps": threat["eps"], "points": points}
            if checks is not None:
                checks.append(sanity.steps_verdict(points, n))
        big = next((t for t in run["tasks"] if t["kind"] == "sanity"), None)
        if checks is not None and big is not None:
            rows = store.samples(run_id, big["task"])
            attacked = sum(r.clean_correct for r in rows)
            checks.append(sanity.large_eps_verdict(sum(r.robust for r in rows), attacked, big["eps"]))
        if checks is not None:
            checks.append(blackbox_verdict(per_attack, metric.clean))
        rejected = sum(b["rejected"] for b in batches.values())
        if checks is not None:
            if rejected and config.get("defenses"):  # attacks see a view of the defense, so expected
                checks.append(sanity.verdict("verification", "pass", f"{rejected} examples adversarial to the "
                                             "attacker's view (BPDA surrogate, single draws, or the undefended model) "
                                             "were not adversarial to the defended model and were not counted"))
            elif rejected:
                checks.append(sanity.verdict("verification", "warn", f"{rejected} claimed adversarial examples failed "
                                             "re-verification and were not counted"))
            else:
                checks.append(sanity.verdict("verification", "pass", "every counted adversarial example was re-verified"))
        ensemble = metric.compute()
        worst, extra = worst_case(store, run, main, threat["eps"])
        computed = worst.compute()
        if checks is not None:
            checks.append(worst_case_verdict(extra, ensemble["robust_accuracy"], computed["robust_accuracy"]))
        if eps_curve and extra:
            eps_curve = [{**p, "robust_accuracy": computed["robust_accuracy"]} if p["eps"] == threat["eps"] else p
                         for p in eps_curve]
        summary = {
            "run_id": run_id,
            "protocol": cls.name,
            "model": run["model"],
            "dataset": run["dataset"],
            "split": run["split"],
            "n": n if not partial else run["n"],
            "threat": threat,
            "clean_accuracy": computed["clean_accuracy"],
            "robust_accuracy": computed["robust_accuracy"],
            "ensemble_robust_accuracy": ensemble["robust_accuracy"],
            "ci95": computed["ci95"],
            "attacks": per_attack,
            "eps_curve": eps_curve,
            "steps_curve": steps_curve,
            "min_norm": min_norm_summary(main, [a["name"] for i, a in enumerate(attacks) if _is_minimum_norm(a, minimum_norm.get(i))],
                                         threat["eps"]),
            "rejected": rejected,
            "seconds": round(sum(c["seconds"] for t in run["tasks"] for c in store.attack_costs(run_id, t["task"])), 4),
        }
        if config.get("defenses"):
            summary["defenses"] = config["defenses"]
        naive = {t["kind"]: accuracy(t) for t in run["tasks"] if t["kind"] in NON_ADAPTIVE}
        if naive:
            summary["non_adaptive"] = {"robust_accuracy": naive.get("non-adaptive"),
                                       "transfer_robust_accuracy": naive.get("transfer")}
            if checks is not None:
                checks.append(adaptive_gap_verdict(naive, ensemble["robust_accuracy"], n))
        if partial:
            summary.update(done=n, partial=True)
        return summary

    leaderboard_columns = ("robust_accuracy", "clean_accuracy")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        config = run["config"]
        eps = float(config["eps"])
        return (run["dataset"], cls.name, config["norm"], round(eps, 8)), ""

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """A full evaluation runs at least the reference ensemble (``standard``; ``rand`` for a
        randomized model): each of its attacks, at least as strong (steps, restarts, EOT draws, queries,
        target classes), in any order and with any attacks added. A run may instead declare a stronger
        ensemble in its config: ``declared_strength = {"at_least": "standard", "reason": "..."}``.
        A defended model's run also needs its adaptive evaluation (:func:`non_adaptive_only`)."""
        unreliable = non_adaptive_only(run)
        if unreliable:  # no declared strength makes up for it
            return [unreliable]
        config = cls.normalize_config(run["config"])
        reference = "rand" if (run.get("model_info") or {}).get("randomized") else "standard"
        declared = config.get("declared_strength")
        if isinstance(declared, dict) and declared.get("at_least") == reference:
            return []
        threat = ThreatModel(config["norm"], float(config["eps"]))
        ran = config.get("attacks") or []
        missing = []
        for ref in SUITES.get(reference)(threat):
            need = {k: v for k, v in ref.params.items() if k in STRENGTH_KEYS}
            same = [a.get("params") or {} for a in ran if a.get("name") == ref.name]
            if any(all(_number(p.get(k)) >= v for k, v in need.items()) for p in same):
                continue
            short = [f"{k} {p.get(k)} < {v}" for p in same[:1] for k, v in need.items() if _number(p.get(k)) < v]
            missing.append(f"{ref.name} ({', '.join(short)})" if short else ref.name)
        return [f"weaker than the {reference} ensemble: lacks {', '.join(missing)}"] if missing else []


def non_adaptive_only(run: dict[str, Any]) -> str | None:
    """Why a defended model's run is not an adaptive evaluation (None if it is, or the model is not
    defended): no adaptive attack recorded (the defense was not paired with its attack: a run stored by
    code that did not pair them), or its main (adaptive) task missing with only the non-adaptive tasks
    stored. Such a run's robust accuracy is what the defense's authors would have printed."""
    config, info = run.get("config") or {}, run.get("model_info") or {}
    if not (config.get("defenses") or info.get("defenses")):
        return None
    mark = "unreliable: a defended model evaluated only non-adaptively"
    if not info.get("adaptive_attack"):
        return f"{mark} (no adaptive attack recorded)"
    tasks = run.get("tasks")
    if tasks is not None and not any(t.get("task") == "main" for t in tasks):
        return f"{mark} (its adaptive task is missing)"
    return None


def worst_case(store: ResultsStore, run: dict[str, Any], main: list[SampleRow],
               eps: float) -> tuple[RobustAccuracy, dict[str, int]]:
    """Robust accuracy as the per-sample worst case over everything the run computed inside the main
    ball: a point the ensemble left robust counts as broken when another task at the same epsilon (the
    steps curve) or a smaller one of the same norm (the epsilon curve) broke it, with a verified
    example. Returns the metric and, per task, how many such points it broke."""
    robust = {r.sample_index for r in main if r.robust}
    extra: dict[str, int] = {}
    broken: set[int] = set()
    for t in run["tasks"]:
        if t["task"] == "main" or t["kind"] not in ("steps", "eps", *NON_ADAPTIVE) or t["eps"] > eps:
            continue
        hit = {r.sample_index for r in store.samples(run["run_id"], t["task"])
               if r.clean_correct and not r.robust and r.broken_by is not None} & robust
        if hit:
            extra[t["task"]] = len(hit)
            broken |= hit
    metric = RobustAccuracy().update([r.clean_correct for r in main],
                                     [r.robust and r.sample_index not in broken for r in main],
                                     [r.broken_by for r in main])
    return metric, extra


def adaptive_gap_verdict(naive: dict[str, float | None], adaptive: float | None, n: int) -> dict[str, str]:
    """A defended model: the non-adaptive attacks (as its authors would have run them) leaving more
    points robust than the adaptive ones is the signature of gradient masking; the reported number is
    the per-sample worst case over all of them."""
    white = naive.get("non-adaptive")
    if white is None or adaptive is None:
        return sanity.verdict("adaptive-gap", "warn", "not computed: the non-adaptive or the adaptive attacks are unfinished")
    gap = white - adaptive
    detail = (f"non-adaptive attacks leave {100 * white:.2f}% robust, adaptive ones {100 * adaptive:.2f}%"
              + (f", transfer from the undefended model {100 * naive['transfer']:.2f}%" if naive.get("transfer") is not None else ""))
    if gap * n <= max(1, n // 100):
        return sanity.verdict("adaptive-gap", "pass", detail)
    return sanity.verdict("adaptive-gap", "fail" if gap > 0.05 else "warn",
                          detail + f": the non-adaptive evaluation overestimates robustness by {100 * gap:.2f} points "
                          "(its gradients are masked or averaged away); only the adaptive number counts")


def worst_case_verdict(extra: dict[str, int], ensemble: float | None, worst: float | None) -> dict[str, str]:
    """Any setting the run computed that breaks points the ensemble left robust shows the ensemble is
    too weak (the reported number counts those points broken)."""
    if not extra:
        return sanity.verdict("worst-case", "pass", "no other attack setting of the run broke a point the ensemble "
                              "left robust")
    where = ", ".join(f"{task}: {k}" for task, k in extra.items())
    return sanity.verdict("worst-case", "warn", f"other attack settings of this run broke points the ensemble left "
                          f"robust ({where}): the ensemble alone gave {100 * ensemble:.2f}%, the reported robust "
                          f"accuracy {100 * worst:.2f}% counts them broken; strengthen the ensemble")


def _number(value: Any) -> float:
    """A recorded strength parameter as a number (missing or not a number: 0, weaker than any)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _randomized(model: nn.Module) -> bool:
    return bool(getattr(model, "randomized", False))


def _is_minimum_norm(attack: dict[str, Any], stored: bool | None) -> bool:
    """Whether a recorded attack is a minimum-norm one (stores before this protocol did not record
    it: ask the registry)."""
    if stored is not None:
        return bool(stored)
    return attack["name"] in ATTACKS and ATTACKS.get(attack["name"]).minimum_norm


def _all_minimum_norm(attacks: list[Attack]) -> bool:
    return all(a.minimum_norm for a in attacks)


def run_binarization(model, attacks, x, y, seed, device) -> dict[str, str]:
    """The binarization test on the first correctly classified probe points, with the first attack of
    the ensemble (white-box ones first) that can attack a two-class model."""
    with eval_mode(model), torch.no_grad():
        keep = (model(x).argmax(dim=1) == y).nonzero(as_tuple=True)[0][:BINARIZATION_SAMPLES]
    if keep.numel() == 0:
        return sanity.verdict("binarization", "warn", "not run: no correctly classified probe point")
    for attack in sorted(attacks, key=lambda a: a.kind != "white-box"):  # white-box attacks first
        try:
            gen = make_generator(seed, zlib.crc32(b"binarization"), device=device)
            return binarization_test(model, attack, x[keep], gen)
        except RobustlabError:
            continue  # e.g. a DLR loss needs three classes
    return sanity.verdict("binarization", "warn", "not run: no attack of the ensemble can attack a two-class model")


def blackbox_verdict(per_attack: list[dict[str, Any]], attacked: int) -> dict[str, str]:
    """A black-box attack that breaks points after white-box attacks gave up suggests masked gradients."""
    white = [a for a in per_attack if a["kind"] == "white-box"]
    late = [a for a in per_attack if a["kind"] != "white-box" and any(w["index"] < a["index"] for w in white)]
    if not white or not late:
        return sanity.verdict("black-box", "pass", "no black-box attack ran after a white-box one")
    broken = sum(a["broken"] for a in late)
    names = "+".join(a["name"] for a in late)
    left = attacked - sum(a["broken"] for a in per_attack if a["index"] < late[0]["index"])
    detail = f"{names} broke {broken} of {left} points the white-box attacks left robust"
    if broken == 0:
        return sanity.verdict("black-box", "pass", detail)
    status = "fail" if broken > max(1, attacked // 50) else "warn"
    return sanity.verdict("black-box", status, detail + ": the white-box attacks are being fooled (masked gradients?)")


def min_norm_summary(rows: list[SampleRow], names: list[str], eps: float) -> dict[str, Any] | None:
    """From the smallest perturbation found per sample (minimum-norm attacks ``names``): accuracy
    against budget from one run, the median distance, and the budget that breaks every point."""
    if not names:
        return None
    correct = [r for r in rows if r.clean_correct]
    dists = sorted(r.min_distance for r in correct if r.min_distance is not None)
    n = len(rows)
    top = dists[-1] if dists else 0.0
    grid = sorted({0.0, eps, *dists[:: max(1, len(dists) // 50)], top})
    curve = [{"eps": e, "robust_accuracy": (len(correct) - sum(1 for d in dists if d <= e)) / n} for e in grid] if n else []
    return {
        "attacks": names,
        "found": len(dists),
        "attacked": len(correct),
        "median": dists[len(dists) // 2] if dists else None,
        "eps_for_full_success": top if dists and len(dists) == len(correct) else None,
        "curve": curve,
    }

