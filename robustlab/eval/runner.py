"""The evaluation runner: what every protocol shares. Tasks split into batches of fixed sample
ranges, randomness from (seed, task, batch, ...), resume from the batches done (and from a long
batch's saved partial state), one process per run at a time (a lease in the store, renewed after
every batch), sharding across torchrun ranks, the results store, progress. What a
batch does, and how its rows become numbers, is the protocol's (``robustlab.eval.protocols``).

``evaluate(model, data, attacks, store)`` runs the adversarial protocol; ``certify(model, data,
options, store)`` the certified one (randomized smoothing); ``segment(model, data, attacks, store)``
the segmentation one; ``zero_shot(sets, attacks, store)`` the zero-shot one (a vision-language model on
many data sets); ``run(model, data, protocol, store)`` any protocol.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

import robustlab
from robustlab import distributed
from robustlab.attacks.base import ATTACKS, Attack
from robustlab.certify.smoothing import check_base_model
from robustlab.data import Dataset, is_dense
from robustlab.defenses import AttackerNeeds, DefendedModel
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.protocols.adversarial import AdversarialOptions, AdversarialProtocol
from robustlab.eval.protocols.base import BatchContext, Protocol, RunFiles, Task
from robustlab.eval.protocols.certified import CertifiedOptions, CertifiedProtocol
from robustlab.eval.protocols.zero_shot import DEFAULT_EPS, EXAMPLES_PER_SET, ZeroShotProtocol
from robustlab.eval.store import ResultsStore
from robustlab.models.probe import probe_model
from robustlab.models.runtime import fast_runtime, full_float32
from robustlab.params import parse_spec
from robustlab.progress import TimeLeft
from robustlab.progress import progress as show_progress

_MODEL_DRAWS = 0xD5AE5  # generator key of a randomized model's own draws


@dataclass
class RunResult:
    """What a run returns: the run id, its summary and sanity verdicts (as in the store)."""

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
    """Everything besides model, data and attacks that determines the numbers of an adversarial run
    (seed, batch_size, examples and extra are every protocol's; the rest the adversarial protocol's)."""

    eps_grid: tuple[float, ...] = ()
    steps_grid: tuple[int, ...] | None = None  # None: derived from the first iterative attack; (): none
    seed: int = 0
    batch_size: int = 128
    sanity: bool = True
    examples: int = 8
    reuse: bool = False  # epsilon-curve points reuse what smaller balls broke (see protocols.adversarial)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the config (e.g. class names)

    def adversarial(self) -> AdversarialOptions:
        return AdversarialOptions(self.eps_grid, self.steps_grid, self.sanity, self.reuse)


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


def evaluate(
    model: nn.Module,
    data: Dataset,
    attacks: list[Attack],
    store: ResultsStore | None,
    *,
    options: EvalOptions | None = None,
    **kwargs: Any,
) -> RunResult:
    """Evaluate ``model`` on ``data`` under the ensemble ``attacks`` (all on one threat model).

    Only correctly classified points are attacked; each attack only sees points still robust; every
    claimed success is re-verified. Results go to ``store`` batch by batch; with ``resume=True`` an
    unfinished run of the same configuration is continued instead of starting a new one.
    A :class:`~robustlab.defenses.DefendedModel` is attacked adaptively (:func:`adaptive_attacks`)
    and its defenses are recorded with the run; the attacks as given also run non-adaptively (on the
    defended model as if it were plain, and transferred from the undefended model), and the reported
    robust accuracy is the per-sample worst case over all of them. Other keyword arguments are :func:`run`'s.
    """
    options = options or EvalOptions()
    if not attacks:
        raise RobustlabError("give at least one attack")
    defenses = None
    given = list(attacks)
    if isinstance(model, DefendedModel):  # attack it adaptively, and record what was done
        needs = attacker_needs(model)
        attacks = adaptive_attacks(attacks, needs)
        defenses = model.configs()
        info = {**(kwargs.get("model_info") or {}), "defenses": defenses, "adaptive_attack": needs.describe()}
        single = [a.name for a in attacks if a.kind == "white-box" and needs.eot > 1 and "eot" not in a.params]
        if single:
            info["not_adaptive"] = (f"{', '.join(single)} take no eot parameter: their gradients see one draw of "
                                    "the randomized defense")
            kwargs.get("log", lambda msg: None)(f"robustlab: warning: {info['not_adaptive']}")
        kwargs["model_info"] = info
    # a transfer from the undefended model needs one that takes the images as they are (no encoding)
    transfer = defenses is not None and all(d.output_channels(1) == 1 for d in model.defenses)
    protocol = AdversarialProtocol(attacks, options.adversarial(), defenses, naive_attacks=given if defenses else None,
                                   transfer=transfer)
    return run(model, data, protocol, store, seed=options.seed, batch_size=options.batch_size,
               examples=options.examples, extra=options.extra, **kwargs)


def certify(
    model: nn.Module,
    data: Dataset,
    options: CertifiedOptions | None,
    store: ResultsStore | None,
    *,
    seed: int = 0,
    batch_size: int = 16,
    **kwargs: Any,
) -> RunResult:
    """Certify the smoothing of the base classifier ``model`` on ``data`` (randomized smoothing with
    ``options``: noise, n0, n, alpha, the attack check) into ``store``. ``batch_size`` images per
    stored batch (the unit of resume); the noisy copies go through the model ``options.noise_batch``
    at a time. A base model with BatchNorm in training mode is refused. Other keyword arguments are
    :func:`run`'s."""
    check_base_model(model)
    protocol = CertifiedProtocol(options, data.num_classes)
    return run(model, data, protocol, store, seed=seed, batch_size=batch_size, examples=0, **kwargs)


def segment(
    model: nn.Module,
    data: Dataset,
    attacks: list[Attack],
    store: ResultsStore | None,
    *,
    eps_grid: tuple[float, ...] = (),
    seed: int = 0,
    batch_size: int = 64,
    **kwargs: Any,
) -> RunResult:
    """Evaluate the segmentation model ``model`` on the per-pixel data ``data``: mIoU and pixel
    accuracy, clean and under ``attacks`` on the per-pixel loss (the segmentation protocol, at the
    attacks' epsilon and at each of ``eps_grid``). A :class:`~robustlab.defenses.DefendedModel` is
    attacked adaptively (:func:`adaptive_attacks`) and its defenses are recorded with the run. Other
    keyword arguments are :func:`run`'s."""
    from robustlab.eval.protocols.segmentation import SegmentationProtocol

    defenses = None
    if isinstance(model, DefendedModel):
        needs = attacker_needs(model)
        attacks = adaptive_attacks(attacks, needs, dense=True)
        defenses = model.configs()
        kwargs["model_info"] = {**(kwargs.get("model_info") or {}), "defenses": defenses,
                                "adaptive_attack": needs.describe()}
    protocol = SegmentationProtocol(attacks, data.num_classes, eps_grid, list(data.classes), defenses=defenses)
    return run(model, data, protocol, store, seed=seed, batch_size=batch_size, **{"examples": 0, **kwargs})


def zero_shot(
    sets: list[Any],
    attacks: list[Attack],
    store: ResultsStore | None,
    *,
    eps: tuple[float, ...] = DEFAULT_EPS,
    sanity_checks: bool = True,
    vlm_info: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    **kwargs: Any,
) -> RunResult:
    """Zero-shot clean and robust accuracy of one vision-language model on every data set of ``sets``
    (:class:`~robustlab.vlm.suite.ZeroShotSet`: data + zero-shot head, see
    :func:`robustlab.vlm.suite.build_sets`) at each epsilon of ``eps`` under the ensemble ``attacks``
    (their norm; rebuilt at each epsilon), into ``store`` as one run. ``vlm_info`` (spec, source,
    weights_sha256) is recorded as the model's info. Other keyword arguments are :func:`run`'s."""
    protocol = ZeroShotProtocol(list(sets), attacks, tuple(eps), sanity_checks, vlm_info)
    info = {**(vlm_info or {}), **(kwargs.pop("model_info", None) or {})}
    first = protocol.sets[0]
    return run(first.head, first.data, protocol, store, seed=seed, batch_size=batch_size, examples=EXAMPLES_PER_SET,
               model_info=info, **kwargs)


def attacker_needs(model: DefendedModel) -> AttackerNeeds:
    """What attacking ``model`` adaptively takes (:meth:`DefendedModel.needs`), without the declared
    attacks that cannot attack it (``Attack.runs_on``: one built for a defense that needs it alone in
    front of the network, when others are stacked), so the run records only what it ran."""
    needs = model.needs()
    runnable = tuple(a for a in needs.attacks if ATTACKS.get(parse_spec(a, "attack")[0]).runs_on(model))
    return replace(needs, attacks=runnable)


def adaptive_attacks(attacks: list[Attack], needs: AttackerNeeds, dense: bool = False) -> list[Attack]:
    """The attacks made adaptive to a defense: gradient attacks that average over draws (an ``eot``
    parameter left at 1) average over the defense's ``needs.eot`` draws. BPDA and gradients through
    iterative steps are the defended model's own forward pass, so every attack gets them. Attacks on
    cross-entropy maximize ``needs.loss`` instead where a defense declares one (``Attack.with_loss``). The attacks
    the defenses declare as their own (``needs.attacks``, e.g. the thermometer's LS-PGA) are added on
    the given attacks' threat model, unless one of that name is given already or it cannot run there
    (another norm; per-pixel labels when ``dense``)."""
    out = [a.with_loss(needs.loss) for a in attacks] if needs.loss else list(attacks)
    if needs.eot > 1:
        out = [a.with_params(eot=needs.eot) if a.params.get("eot") == 1 else a for a in out]
    given = {a.name for a in out}
    for spec in needs.attacks:
        name, params = parse_spec(spec, "attack")
        cls = ATTACKS.get(name)
        threat = out[0].threat
        if name in given or threat.norm not in cls.norms or (dense and not cls.dense):
            continue
        out.append(cls(threat, targeted=out[0].targeted, **params))
    return out


@full_float32()  # the model as defined, not TF32 on CUDA (see full_float32)
def run(
    model: nn.Module,
    data: Dataset,
    protocol: Protocol,
    store: ResultsStore | None,
    *,
    seed: int = 0,
    batch_size: int = 128,
    examples: int = 8,
    extra: dict[str, Any] | None = None,
    model_name: str = "model",
    model_info: dict[str, Any] | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> RunResult:
    """Run ``protocol`` on ``model`` and ``data`` into ``store`` (rank 0; other torchrun ranks pass
    None). ``extra`` is recorded in the configuration; ``examples``: how many examples of the main
    task to keep for the report."""
    if batch_size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    # Probe the model before anything is written: bad models fail here with a clear message.
    dense = protocol.dense
    if is_dense(data) != dense:
        raise RobustlabError(f"data set {data.name!r} has {'per-pixel labels (segmentation)' if is_dense(data) else 'one label per image'}"
                             f"; the {protocol.name} protocol evaluates "
                             f"{'segmentation models on per-pixel labels' if dense else 'classifiers'}")
    probe_x, probe_y = _batch(data, 0, min(len(data), batch_size), device)
    card = (model_info or {}).get("card") or {}
    probe_model(model, probe_x, model_desc=f"the model {model_name}", data_desc=f"{data.name}:{data.split}",
                num_classes=data.num_classes, input_size=(card.get("preprocessing") or {}).get("input_size"),
                dense=dense)
    # The fastest memory layout for the whole run (the caller's model is given back as it was).
    with fast_runtime(model, probe_x) as runtime:
        info = {**(model_info or {}), **sanity.inspect_model(model, probe_x, dense=dense), **runtime}
        tasks = protocol.plan(len(data), int(np.prod(data.image_shape)))
        config = {
            "model": model_name,
            "model_sha256": card.get("sha256"),
            "dataset": data.name,
            "split": data.split,
            "n": len(data),
            "seed": seed,
            "batch_size": batch_size,
            **protocol.config(),
            **(extra or {}),
        }
        # Under torchrun, rank 0 owns the store: it opens or resumes the run, hands out batches and merges
        # every rank's per-sample results; the other ranks pass store=None.
        main = distributed.is_main()
        if main and store is None:
            raise RobustlabError("evaluation needs a results store (rank 0)")
        run_id, resumed = None, False
        if main:
            store.ensure_sample_table(protocol.sample_table, protocol.sample_columns)
            run_id = store.find_resumable(protocol.name, config, type(protocol).normalize_config) if resume else None
            resumed = run_id is not None
            if resume and not resumed:
                done = store.find_resumable(protocol.name, config, type(protocol).normalize_config, complete=True)
                if done is not None:  # nothing to resume: the run is finished, give its result again
                    log(f"run {done} with this configuration is already complete; its result:")
                    stored = store.get_run(done)
                    return distributed.broadcast(RunResult(done, stored["summary"], stored["checks"], resumed=True))
                log("no unfinished run with this configuration in the store; starting a new run")
            if run_id is None:
                run_id = store.create_run(protocol.name, config, environment(device),
                                          {**info, "processes": distributed.world_size()}, protocol.attack_records())
            else:
                store.acquire_lease(run_id)  # refused while another live process works on it
                log(f"resuming run {run_id}")
                store.set_status(run_id, "running")
            for t in tasks:
                store.add_task(run_id, t.name, t.kind, t.n, t.params)

        try:
            try:
                _prepare(model, protocol, store, run_id, seed, device, log)
                _run_tasks(model, data, protocol, tasks, store, run_id, seed, batch_size, examples, device, progress)
            except BaseException:
                if main:
                    store.set_status(run_id, "interrupted")
                raise
            result = None
            if main:
                checks = protocol.final_checks(model, probe_x, probe_y, info, seed, device)
                summary = type(protocol).summarize(store, {**store.get_run(run_id), "status": "complete"}, checks)
                summary = json.loads(json.dumps(summary))  # exactly as the store holds it (lists, not tuples)
                store.finish_run(run_id, summary, checks)
                result = RunResult(run_id, summary, checks, resumed)
        finally:
            if main:
                store.release_lease(run_id)
        return distributed.broadcast(result)


def _prepare(model: nn.Module, protocol: Protocol, store: ResultsStore | None, run_id: str | None, seed: int,
             device: torch.device, log: Callable[[str], None]) -> None:
    """The protocol's once-per-run fits, kept with the run in the store (rank 0); other torchrun ranks
    read rank 0's files and fit nothing."""
    if distributed.is_main():
        files = RunFiles(lambda name: store.load_file(run_id, name), lambda name, data: store.save_file(run_id, name, data))
        protocol.prepare(model, files, seed, device, log)
        distributed.broadcast(files.seen)
    else:
        seen = distributed.broadcast(None)
        protocol.prepare(model, RunFiles(seen.get), seed, device, lambda msg: None)


def _batch(data: Dataset, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..stop-1 of the data set, on ``device``."""
    x, y = data.batch(range(start, stop))
    return x.to(device), y.to(device)


def _run_tasks(model, data, protocol, tasks: list[Task], store, run_id, seed, bs, examples, device, progress) -> None:
    """Run every batch not yet done. With several processes, rank r takes the r-th batch of each
    round of world-size batches and rank 0 writes the round's results in order."""
    todo = None
    if distributed.is_main():
        todo = [(i, b) for i, t in enumerate(tasks) for b in range((t.n + bs - 1) // bs)
                if b not in store.done_batches(run_id, t.name)]
    todo = distributed.broadcast(todo)
    world, me = distributed.world_size(), distributed.rank()
    bar = show_progress(total=len(todo), desc="evaluating", unit="batch", enabled=False if me else progress)

    def size(i: int, b: int) -> int:
        return min(bs, tasks[i].n - b * bs)

    # The time left, from the work left: per task, its batches left times the seconds per sample its
    # batches (else its kind's) took, batches done before a resume included; the rest is said unknown.
    eta = TimeLeft()
    for i, b in todo:
        eta.plan(tasks[i].name, size(i, b), tasks[i].kind)
    if distributed.is_main():
        n_of = {t.name: t.n for t in tasks}
        for name, b, seconds in store.batch_seconds(run_id):
            if name in n_of:
                eta.measured(name, min(bs, n_of[name] - b * bs), seconds)
    if hasattr(bar, "time_left"):
        bar.time_left = eta.text
    with bar:
        for first in range(0, len(todo), world):
            round_ = todo[first : first + world]
            started = time.perf_counter()
            for i, b in round_:
                eta.start(tasks[i].name, size(i, b))
            mine = None
            if me < len(round_):
                i, b = round_[me]
                task = tasks[i]
                start, stop = b * bs, min((b + 1) * bs, task.n)

                def status(step: str, points: int, name: str = task.name, b: int = b) -> None:
                    bar.set_postfix_str(f"{name}, batch {b + 1}: {step} on {points} robust points")
                    bar.update(0)  # a log line is due when the interval has passed

                def save(state: bytes, name: str = task.name, b: int = b) -> None:
                    store.save_partial(run_id, name, b, state)
                    store.heartbeat(run_id)

                def done_rows(name: str, start: int = start, stop: int = stop) -> list[Any]:
                    return [r for r in store.sample_rows(protocol.sample_table, run_id, name)
                            if start <= r["sample_index"] < stop]

                # One process: a batch killed between two of its steps goes on from the last one done,
                # and a task may read what other tasks found (with several, only rank 0 holds the store).
                single = world == 1
                ctx = BatchContext(
                    seed=seed, task=task, batch_index=b, start=start, device=device,
                    keep_examples=examples if task.name == "main" else 0, status=status,
                    saved=store.load_partial(run_id, task.name, b) if single else None,
                    save=save if single else None, done_rows=done_rows if single else None,
                )
                x, y = _batch(protocol.task_data(task, data), start, stop, device)
                task_model = protocol.task_model(task, model)
                if hasattr(task_model, "set_generator"):  # a randomized defense draws from (seed, task, batch)
                    task_model.set_generator(ctx.generator(_MODEL_DRAWS))
                out = protocol.run_batch(task_model, x, y, ctx)
                mine = (out.rows, out.costs, out.rejected, out.examples)
            results = distributed.gather(mine)
            for i, b in round_:
                eta.done(tasks[i].name, size(i, b), (time.perf_counter() - started) / len(round_))
            if not distributed.is_main():
                continue
            for (i, b), (rows, costs, rejected, kept) in zip(round_, results):
                name = tasks[i].name
                if kept:
                    kept = kept[: max(0, examples - store.count_examples(run_id, name))]
                store.write_batch(run_id, name, b, rows, costs, rejected, kept, table=protocol.sample_table)
                store.heartbeat(run_id)
                bar.set_postfix_str(name)
                bar.update(1)
