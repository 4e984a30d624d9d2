"""The evaluation runner: clean accuracy, a worst-case attack ensemble on still-robust points, every
success re-verified, robustness curves over epsilons and iterations, sanity checks, all per sample
into the results store, resumable after a crash.

Work is split into tasks (main, each curve point, the large-epsilon check) and batches of fixed
sample ranges. A batch's randomness comes from (seed, task, batch, attack), so a resumed run gives
exactly the numbers of an uninterrupted one; a long batch killed between two attacks goes on from
the last one it finished (``robustlab.eval.partial``).
"""

from __future__ import annotations

import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import robustlab
from robustlab.attacks.base import Attack, create_attack
from robustlab import distributed
from robustlab.eval import partial, sanity
from robustlab.eval.binarization import binarization_test
from robustlab.eval.partial import BatchState
from robustlab.eval.store import Example, ResultsStore, SampleRow
from robustlab.eval.verify import verify_adversarial
from robustlab.checks import check_logits
from robustlab.data import ImageDataset
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode, fast_runtime, full_float32
from robustlab.progress import progress as show_progress
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel

LARGE_EPS_SAMPLES = 200


@dataclass
class Task:
    name: str
    kind: str  # main | eps | steps | sanity
    threat: ThreatModel
    attacks: list[Attack]
    n: int
    steps: int | None = None


@dataclass
class RunResult:
    """What ``evaluate`` returns: the run id, its summary and sanity verdicts (as in the store)."""

    run_id: str
    summary: dict[str, Any]
    checks: list[dict[str, str]]
    resumed: bool = False

    @property
    def clean_accuracy(self) -> float:
        return self.summary["clean_accuracy"]

    @property
    def robust_accuracy(self) -> float:
        return self.summary["robust_accuracy"]


@dataclass
class EvalOptions:
    """Everything besides model, data and attacks that determines the numbers of a run."""

    eps_grid: tuple[float, ...] = ()
    steps_grid: tuple[int, ...] | None = None  # None: derived from the first iterative attack; (): none
    seed: int = 0
    batch_size: int = 128
    sanity: bool = True
    examples: int = 8
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the config (e.g. class names)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded with every run."""
    env = {
        "robustlab": robustlab.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


STRENGTH_PARAMS = ("steps", "queries")


def default_steps_grid(steps: int) -> tuple[int, ...]:
    """Strengths for the attack-strength curve around an attack's own: up to twice as strong."""
    return tuple(sorted({max(1, steps // 10), max(1, steps // 2), steps, 2 * steps}))


def strength_attack(attacks: list[Attack]) -> tuple[Attack, str] | tuple[None, None]:
    """The first attack with a strength parameter (iterations for white-box, queries for black-box)."""
    for a in attacks:
        for param in STRENGTH_PARAMS:
            if param in a.params:
                return a, param
    return None, None


def plan_tasks(attacks: list[Attack], n: int, image_dim: int, options: EvalOptions) -> list[Task]:
    """The main ensemble, the epsilon curve, the steps curve and the large-epsilon check."""
    threat = attacks[0].threat
    tasks = [Task("main", "main", threat, attacks, n)]
    for eps in sorted(set(float(e) for e in options.eps_grid)):
        if eps != threat.eps:
            t = threat.with_eps(eps)
            tasks.append(Task(f"eps={eps:g}", "eps", t, [a.with_threat(t) for a in attacks], n))
    iterative, param = strength_attack(attacks)
    grid = options.steps_grid
    if grid is None:
        grid = default_steps_grid(iterative.params[param]) if iterative else ()
    if grid and iterative is None:
        raise RobustlabError("a steps grid needs an attack with a 'steps' or 'queries' parameter")
    for steps in sorted(set(int(s) for s in grid)):
        if steps < 1:
            raise RobustlabError(f"{param} in the steps grid must be >= 1, got {steps}")
        if len(attacks) == 1 and steps == iterative.params[param]:
            continue  # the main task is this point already
        tasks.append(Task(f"{param}={steps}", "steps", threat, [iterative.with_params(**{param: steps})], n, steps))
    if options.sanity:
        big = threat.with_eps(sanity.large_eps(threat, image_dim))
        pgd = create_attack("pgd", big, steps=20)
        tasks.append(Task("sanity:large-eps", "sanity", big, [pgd], min(n, LARGE_EPS_SAMPLES)))
    return tasks


@full_float32()  # the model as defined, not TF32 on CUDA (see full_float32)
def evaluate(
    model: nn.Module,
    data: ImageDataset,
    attacks: list[Attack],
    store: ResultsStore | None,
    *,
    model_name: str = "model",
    model_info: dict[str, Any] | None = None,
    options: EvalOptions | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> RunResult:
    """Evaluate ``model`` on ``data`` under the ensemble ``attacks`` (all on one threat model).

    Only correctly classified points are attacked; each attack only sees points still robust; every
    claimed success is re-verified. Results go to ``store`` batch by batch; with ``resume=True`` an
    unfinished run of the same configuration is continued instead of starting a new one.
    """
    options = options or EvalOptions()
    if not attacks:
        raise RobustlabError("give at least one attack")
    threat = attacks[0].threat
    for a in attacks:
        if a.threat != threat:
            raise RobustlabError(f"all attacks of an ensemble need one threat model; {a.name} has {a.threat}, not {threat}")
        if a.targeted:
            raise RobustlabError(f"the ensemble counts misclassifications; attack {a.name} is targeted")
    if options.batch_size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {options.batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    # Probe the model before anything is written: bad models fail here with a clear message.
    probe_x = data.x[: min(len(data), options.batch_size)].to(device)
    with eval_mode(model), torch.no_grad():
        try:
            out = model(probe_x)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RobustlabError(
                f"the model failed on a batch of shape {tuple(probe_x.shape)} from {data.name}: {exc}"
            ) from None
        check_logits(out, probe_x.shape[0], data.num_classes)
    # The fastest memory layout for the whole run (the caller's model is given back as it was).
    with fast_runtime(model, probe_x) as runtime:
        info = {**(model_info or {}), **sanity.inspect_model(model, probe_x), **runtime}
        tasks = plan_tasks(attacks, len(data), int(np.prod(data.image_shape)), options)
        card = info.get("card") or {}
        config = {
            "model": model_name,
            "model_sha256": card.get("sha256"),
            "dataset": data.name,
            "split": data.split,
            "n": len(data),
            "norm": threat.norm,
            "eps": threat.eps,
            "attacks": [a.config() for a in attacks],
            "eps_grid": sorted(set(float(e) for e in options.eps_grid)),
            "steps_grid": [t.steps for t in tasks if t.kind == "steps"],
            "seed": options.seed,
            "batch_size": options.batch_size,
            "sanity": options.sanity,
            **options.extra,
        }
        # Under torchrun, rank 0 owns the store: it opens or resumes the run, hands out batches and merges
        # every rank's per-sample results; the other ranks pass store=None.
        main = distributed.is_main()
        if main and store is None:
            raise RobustlabError("evaluate needs a results store (rank 0)")
        run_id, resumed = None, False
        if main:
            run_id = store.find_resumable(config) if resume else None
            resumed = run_id is not None
            if resume and not resumed:
                log("no unfinished run with this configuration in the store; starting a new run")
            if run_id is None:
                run_id = store.create_run(
                    config, environment(device), {**info, "processes": distributed.world_size()},
                    [{**a.config(), "targeted": a.targeted} for a in attacks],
                )
            else:
                log(f"resuming run {run_id}")
                store.set_status(run_id, "running")
            for t in tasks:
                store.add_task(run_id, t.name, t.kind, t.threat.eps, t.steps, t.n)

        try:
            _run_tasks(model, data, tasks, store, run_id, options, device, progress)
        except BaseException:
            if main:
                store.set_status(run_id, "interrupted")
            raise
        result = None
        if main:
            checks = sanity.mode_verdicts(info)
            if options.sanity:
                probe_y = data.y[: probe_x.shape[0]].to(device)
                checks.append(sanity.gradient_verdict(model, probe_x, probe_y))
                checks.append(run_binarization(model, attacks, probe_x, probe_y, options.seed, device))
            summary = summarize(store, run_id, attacks, tasks, checks)
            store.finish_run(run_id, summary, checks)
            result = RunResult(run_id, summary, checks, resumed)
        return distributed.broadcast(result)


BINARIZATION_SAMPLES = 10


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


def _run_tasks(model, data, tasks, store, run_id, options, device, progress) -> None:
    """Attack every batch not yet done. With several processes, rank r takes the r-th batch of each
    round of world-size batches and rank 0 writes the round's results in order."""
    bs = options.batch_size
    todo = None
    if distributed.is_main():
        todo = [(i, b) for i, t in enumerate(tasks) for b in range((t.n + bs - 1) // bs)
                if b not in store.done_batches(run_id, t.name)]
    todo = distributed.broadcast(todo)
    world, me = distributed.world_size(), distributed.rank()
    bar = show_progress(total=len(todo), desc="evaluating", unit="batch", enabled=False if me else progress)
    with bar:
        for first in range(0, len(todo), world):
            round_ = todo[first : first + world]
            mine = None
            if me < len(round_):
                i, b = round_[me]
                task = tasks[i]
                start, stop = b * bs, min((b + 1) * bs, task.n)
                keep = options.examples if task.name == "main" else 0

                def status(attack: str, points: int, name: str = task.name, b: int = b) -> None:
                    bar.set_postfix_str(f"{name}, batch {b + 1}: {attack} on {points} robust points")
                    bar.update(0)  # a log line is due when the interval has passed

                def save(state: BatchState, name: str = task.name, b: int = b, keep: int = keep) -> None:
                    store.save_partial(run_id, name, b, state.to_bytes(keep))

                # One process: a batch killed between two of its attacks goes on from the last one done
                # (with several, only rank 0 holds the store, and batches start over).
                x = data.x[start:stop].to(device)
                blob = store.load_partial(run_id, task.name, b) if world == 1 else None
                mine = attack_batch(model, x, data.y[start:stop].to(device), start, task, options.seed, b, device,
                                    keep_examples=keep, on_attack=status,
                                    state=BatchState.from_bytes(blob, x) if blob is not None else None,
                                    save=save if world == 1 else None)
            results = distributed.gather(mine)
            if not distributed.is_main():
                continue
            for (i, b), (rows, costs, rejected, examples) in zip(round_, results):
                name = tasks[i].name
                if examples:
                    examples = examples[: max(0, options.examples - store.count_examples(run_id, name))]
                store.write_batch(run_id, name, b, rows, costs, rejected, examples)
                bar.set_postfix_str(name)
                bar.update(1)


def attack_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: int,
    task: Task,
    seed: int,
    batch_index: int,
    device: torch.device,
    keep_examples: int = 0,
    on_attack: Callable[[str, int], None] | None = None,
    state: BatchState | None = None,
    save: Callable[[BatchState], None] | None = None,
) -> tuple[list[SampleRow], list[dict[str, float]], int, list[Example]]:
    """Run one task's ensemble on one batch. Returns per-sample rows, per-attack costs, the number
    of claimed successes that failed verification, and up to ``keep_examples`` broken examples.
    ``on_attack(name, points)`` is called before each attack that runs (progress display).
    ``state``: a saved state of this batch to go on from; ``save(state)`` is called after an attack
    when another follows and :data:`partial.SAVE_SECONDS` have passed since the batch began or was
    last saved."""
    n = x.shape[0]
    if state is None:
        with eval_mode(model), torch.no_grad():
            clean_pred = check_logits(model(x), n).argmax(dim=1)
        state = BatchState.start(x, y, clean_pred)
    s = state
    task_key = zlib.crc32(task.name.encode())
    last_save = time.perf_counter()
    for ai in range(s.attacks_done, len(task.attacks)):
        attack = task.attacks[ai]
        idx = s.robust.nonzero(as_tuple=True)[0]
        cost = {"seconds": 0.0, "gradients": 0, "forwards": 0}
        if idx.numel() and task.threat.eps > 0:
            if on_attack is not None:
                on_attack(attack.name, idx.numel())
            t0 = time.perf_counter()
            gen = make_generator(seed, task_key, batch_index, ai, device=device)
            res = attack.run(model, x[idx], y[idx], generator=gen)
            s.gradients[idx] += res.gradients
            s.forwards[idx] += res.forwards
            claimed = res.success.nonzero(as_tuple=True)[0]
            if claimed.numel():
                cand = idx[claimed]
                v = verify_adversarial(model, x[cand], res.x_adv[claimed], y[cand], task.threat)
                # A minimum-norm attack may report points beyond eps: their distance is recorded, and
                # they are not counted; from any other attack such a point is a rejected claim.
                s.rejected += int((~v.ok).sum()) if not attack.minimum_norm else int((~v.misclassified).sum())
                found = cand[v.misclassified]
                s.min_distance[found] = torch.minimum(s.min_distance[found], v.distance[v.misclassified])
                ok = v.ok
                hit = cand[ok]
                s.robust[hit] = False
                s.broken_by[hit] = ai
                s.adv_pred[hit] = v.pred[ok]
                s.distance[hit] = v.distance[ok]
                s.x_adv[hit] = res.x_adv[claimed][ok]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cost = {
                "seconds": time.perf_counter() - t0,
                "gradients": int(res.gradients.sum()),
                "forwards": int(res.forwards.sum()),
            }
        s.costs.append(cost)
        s.attacks_done = ai + 1
        if save is not None and ai + 1 < len(task.attacks) and time.perf_counter() - last_save >= partial.SAVE_SECONDS:
            save(s)
            last_save = time.perf_counter()
    rows = []
    for i, (lab, cp, ok, rb, bb, ap, d, g, f, md) in enumerate(
        zip(
            y.tolist(), s.clean_pred.tolist(), s.correct.tolist(), s.robust.tolist(), s.broken_by.tolist(),
            s.adv_pred.tolist(), s.distance.tolist(), s.gradients.tolist(), s.forwards.tolist(),
            s.min_distance.tolist(),
        )
    ):
        rows.append(
            SampleRow(start + i, lab, cp, ok, rb, bb if bb >= 0 else None, ap if ap >= 0 else None,
                      d if bb >= 0 else None, g, f, md if md != float("inf") else None)
        )
    examples = []
    for i in (s.broken_by >= 0).nonzero(as_tuple=True)[0].tolist()[:keep_examples]:
        examples.append(
            Example(start + i, int(y[i]), int(s.adv_pred[i]), x[i].cpu().numpy(), s.x_adv[i].cpu().numpy())
        )
    return rows, s.costs, s.rejected, examples


def summarize(
    store: ResultsStore, run_id: str, attacks: list[Attack], tasks: list[Task], checks: list[dict[str, str]]
) -> dict[str, Any]:
    """Build the run summary from the store (so a resumed run summarizes exactly like an uninterrupted
    one), and append the curve-based sanity verdicts to ``checks``."""
    run = store.get_run(run_id)
    stats = {s["task"]: s for s in store.task_stats(run_id)}
    main = store.samples(run_id, "main")
    n = len(main)
    clean = sum(r.clean_correct for r in main)
    robust = sum(r.robust for r in main)
    costs = store.attack_costs(run_id, "main")
    per_attack = []
    still = clean
    for i, a in enumerate(attacks):
        broken = sum(1 for r in main if r.broken_by == i)
        still -= broken
        cost = costs[i] if i < len(costs) else {"seconds": 0.0, "gradients": 0, "forwards": 0}
        per_attack.append(
            {
                "index": i,
                "name": a.name,
                "kind": a.kind,
                "params": dict(a.params),
                "robust_accuracy": still / n,
                "broken": broken,
                "seconds": round(cost["seconds"], 4),
                "gradients": int(cost["gradients"]),
                "forwards": int(cost["forwards"]),
            }
        )
    threat = attacks[0].threat
    eps_curve = [{"eps": 0.0, "robust_accuracy": clean / n}, {"eps": threat.eps, "robust_accuracy": robust / n}]
    eps_curve += [{"eps": t.threat.eps, "robust_accuracy": stats[t.name]["robust_accuracy"]} for t in tasks if t.kind == "eps"]
    eps_curve = sorted({p["eps"]: p for p in eps_curve}.values(), key=lambda p: p["eps"])
    steps_curve = None
    steps_tasks = [t for t in tasks if t.kind == "steps"]
    iterative, param = strength_attack(attacks)
    if steps_tasks:
        points = [{"steps": t.steps, "robust_accuracy": stats[t.name]["robust_accuracy"]} for t in steps_tasks]
        if len(attacks) == 1:
            points.append({"steps": iterative.params[param], "robust_accuracy": robust / n})
        points = sorted({p["steps"]: p for p in points}.values(), key=lambda p: p["steps"])
        steps_curve = {"attack": iterative.name, "param": param, "kind": iterative.kind, "eps": threat.eps,
                       "points": points}
        checks.append(sanity.steps_verdict(points, n))
    big = next((t for t in tasks if t.kind == "sanity"), None)
    if big is not None:
        rows = store.samples(run_id, big.name)
        attacked = sum(r.clean_correct for r in rows)
        checks.append(sanity.large_eps_verdict(sum(r.robust for r in rows), attacked, big.threat.eps))
    checks.append(blackbox_verdict(per_attack, clean))
    rejected = sum(s["rejected"] for s in stats.values())
    if rejected:
        checks.append(sanity.verdict("verification", "warn", f"{rejected} claimed adversarial examples failed "
                                     "re-verification and were not counted"))
    else:
        checks.append(sanity.verdict("verification", "pass", "every counted adversarial example was re-verified"))
    return {
        "run_id": run_id,
        "model": run["model"],
        "dataset": run["dataset"],
        "split": run["split"],
        "n": n,
        "threat": {"norm": threat.norm, "eps": threat.eps},
        "clean_accuracy": clean / n,
        "robust_accuracy": robust / n,
        "attacks": per_attack,
        "eps_curve": eps_curve,
        "steps_curve": steps_curve,
        "min_norm": min_norm_summary(main, attacks, threat.eps),
        "rejected": rejected,
        "seconds": round(sum(c["seconds"] for t in tasks for c in store.attack_costs(run_id, t.name)), 4),
    }


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


def min_norm_summary(rows: list[SampleRow], attacks: list[Attack], eps: float) -> dict[str, Any] | None:
    """From the smallest perturbation found per sample (minimum-norm attacks): accuracy against
    budget from one run, the median distance, and the budget that breaks every point, if found."""
    if not any(a.minimum_norm for a in attacks):
        return None
    correct = [r for r in rows if r.clean_correct]
    dists = sorted(r.min_distance for r in correct if r.min_distance is not None)
    n = len(rows)
    top = dists[-1] if dists else 0.0
    grid = sorted({0.0, eps, *dists[:: max(1, len(dists) // 50)], top})
    curve = [{"eps": e, "robust_accuracy": (len(correct) - sum(1 for d in dists if d <= e)) / n} for e in grid]
    return {
        "attacks": [a.name for a in attacks if a.minimum_norm],
        "found": len(dists),
        "attacked": len(correct),
        "median": dists[len(dists) // 2] if dists else None,
        "eps_for_full_success": top if dists and len(dists) == len(correct) else None,
        "curve": curve,
    }
