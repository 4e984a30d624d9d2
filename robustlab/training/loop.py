"""The training loop. Objectives plug in: standard training is cross-entropy, adversarial recipes
(``robustlab.training.objectives``) bring their own inner maximization.

One loop for every recipe, with: learning-rate schedules (cosine, multistep, cyclic, constant; linear
warm-up), gradient clipping, an exponential moving average of the weights, robust validation on a
held-out set each epoch with best-epoch restore and early stopping (robust overfitting, Rice et al.
2020), catastrophic-overfitting detection for single-step recipes, mixed precision (float16 autocast with
loss scaling on CUDA, bfloat16 autocast on CPU), channels-last memory format, and a checkpoint after
every epoch from which a killed run resumes to bit-identical weights.

Randomness: the data order of epoch e comes from ``make_generator(seed, e)``; the objective of batch
i of epoch e gets ``make_generator(seed, e, i)`` (random starts, noise); the global torch RNG (dropout)
is reseeded at the start of each epoch from (seed, e) inside a forked RNG state, so the caller's
global RNG is untouched. A resumed run therefore draws exactly the numbers an uninterrupted one does,
and the checkpoint needs no RNG state besides the seed and the epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlab import distributed
from robustlab.checks import check_logits
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode, zero_subnormals_
from robustlab.progress import progress as show_progress
from robustlab.seeding import derive_seed, make_generator
from robustlab.threat import ThreatModel
from robustlab.training import state as train_state
from robustlab.training.ema import ModelEMA
from robustlab.training.monitor import detect_catastrophic_overfitting, robust_validation, split_holdout
from robustlab.training.objectives import Objective
from robustlab.training.schedules import SCHEDULES, make_lr_lambda
from robustlab.training.unlabeled import UnlabeledData, UnlabeledSampler

LegacyObjective = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]
ObjectiveLike = Union[Objective, LegacyObjective]

DROPOUT_KEY = 0x4452  # seeding key of the per-epoch global RNG ("DR")
AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}  # autocast type of --amp per device
CPUINFO = Path("/proc/cpuinfo")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), read from
    :data:`CPUINFO`; None where that cannot be read (not Linux). Without it, bfloat16 autocast is
    emulated and usually slower than float32."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return any(f in flags for f in CPU_BF16_FLAGS)


def standard_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the clean batch (the plain-callable form; see also the ``standard`` recipe);
    per-pixel labels (N, H, W): the mean over every pixel."""
    return F.cross_entropy(check_logits(model(x), x.shape[0], dense=y.dim() > 1), y)


@dataclass
class TrainConfig:
    """How to optimize, validate and stop.

    Optimizer: ``lr`` is the peak learning rate; ``optimizer`` sgd (Nesterov momentum 0.9) or adam;
    ``schedule`` cosine | constant | multistep (``gamma`` at each of ``milestones``, fractions of the
    run) | cyclic (one-cycle triangle, Wong et al. 2020), after ``warmup_epochs`` of linear warm-up;
    ``grad_clip`` clips the global gradient L2 norm; ``ema_decay`` keeps a weight average.

    Validation (needs ``val_n`` > 0 here or ``val_data`` given to :func:`train`): clean and PGD
    accuracy (``val_steps`` steps) each epoch; the best epoch by PGD accuracy (clean accuracy without a
    threat model) is restored at the end if ``restore_best``; ``patience`` > 0 stops after that many
    epochs without improvement. ``co_detection`` (None: on for single-step recipes) stops on
    catastrophic overfitting by the rule in ``robustlab.training.monitor`` (``co_ratio``,
    ``co_min_best``).

    Hardware: ``amp`` mixed precision: float16 autocast with loss scaling on CUDA, bfloat16 autocast on
    CPU (1.95x faster PGD-AT epochs on the AMX-capable development machine; slower on CPUs without
    AVX512-BF16); validation, checkpoints and the weights stay float32.
    ``channels_last`` memory format for model and inputs.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9) | adam
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    grad_clip: float | None = None
    ema_decay: float | None = None
    val_n: int = 0
    val_steps: int = 10
    patience: int = 0
    restore_best: bool = True
    co_detection: bool | None = None
    co_ratio: float = 0.3
    co_min_best: float = 0.1
    amp: bool = False
    channels_last: bool = False

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise RobustlabError("epochs and batch size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RobustlabError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise RobustlabError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise RobustlabError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise RobustlabError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if any(not 0 < m < 1 for m in self.milestones) or not self.gamma > 0:
            raise RobustlabError("milestones must be fractions of the run in (0, 1) and gamma > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise RobustlabError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise RobustlabError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.val_n < 0 or self.val_steps < 1 or self.patience < 0:
            raise RobustlabError("val_n and patience must be >= 0 and val_steps >= 1")
        if not 0 < self.co_ratio < 1:
            raise RobustlabError(f"co_ratio must be in (0, 1), got {self.co_ratio}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["milestones"] = [float(m) for m in self.milestones]
        return out


class TrainHistory(list):
    """The per-epoch records (a list of dicts, JSON-ready), plus:

    ``summary``: best epoch, why training stopped, whether the best weights were restored, the
    catastrophic-overfitting event if any, and the validation numbers of the returned weights;
    ``ema``: the weight-averaged model (eval mode) when ``ema_decay`` is set, else None.
    """

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        super().__init__(records or [])
        self.summary: dict[str, Any] = {}
        self.ema: nn.Module | None = None


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512, device: torch.device | None = None) -> float:
    """Clean accuracy of ``model`` on ``data`` (eval mode, caller's modes restored); per-pixel labels
    (a segmentation data set): the pixel accuracy."""
    device = device or next(model.parameters()).device
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for _, _, x, y in data.batches(batch_size):
            correct += int((model(x.to(device)).argmax(dim=1) == y.to(device)).sum())
            total += y.numel()
    return correct / total


def objective_config(objective: ObjectiveLike) -> dict[str, Any]:
    """JSON description of an objective (its config, or the name of a plain callable)."""
    if isinstance(objective, Objective):
        return objective.config()
    return {"name": getattr(objective, "__qualname__", type(objective).__name__), "params": {}, "threat": None}


def _call_objective(objective: ObjectiveLike, model, x, y, generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = objective(model, x, y, generator) if isinstance(objective, Objective) else objective(model, x, y)
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def _json_normal(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


class _Best:
    """The best epoch so far by the validation metric, with its weights (on CPU)."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.metric = -math.inf
        self.weights: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def offer(self, epoch: int, metric: float, model: nn.Module) -> bool:
        # A tie goes to the later epoch: it has trained longer (and, on a decaying schedule, at a lower rate).
        if metric >= self.metric:
            self.epoch, self.metric, self.bad_epochs = epoch, metric, 0
            self.weights = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    objective: ObjectiveLike = standard_objective,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    *,
    val_data: Dataset | None = None,
    threat: ThreatModel | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    unlabeled: UnlabeledData | None = None,
    save_every: float | None = 300.0,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` with ``objective``; returns the :class:`TrainHistory`.

    data: any :class:`robustlab.data.Dataset`; each batch is ``data.batch(indices)`` (an in-memory
    set is indexed, a streaming one decodes just those images).

    objective: a recipe from ``robustlab.training.objectives`` (``loss, logs = objective(model, x,
    y, generator)``) or a plain callable ``(model, x, y) -> loss``. val_data: the held-out set for
    validation; if None and ``config.val_n`` > 0, ``val_n`` training examples are held out (seeded).
    threat: the threat model of robust validation (default: the objective's). checkpoint_dir: where
    the training state is written after every epoch (safetensors + JSON); resume: continue the run
    saved there (same data, config and objective required), to the weights an uninterrupted run
    would reach. save_every: seconds between two saves within an epoch (the state after the batch
    that passes the interval, with the in-epoch sums and the global RNG state, so a run killed in a
    long epoch resumes from there to the same weights); None: only after epochs, 0: after every
    batch; saving costs little, the states of a run share one file name pattern. on_epoch is called with each epoch's record after its checkpoint is written.

    unlabeled: extra images for recipes that use them (``uses_unlabeled``: ``rst``, ``uat``). Each
    batch of ``config.batch_size`` then holds ``unlabeled.per_batch(batch_size)`` of them (drawn by
    an :class:`~robustlab.training.unlabeled.UnlabeledSampler` whose cursor is part of the saved
    state) and the rest labeled images; an epoch is one pass over the labeled data. The unlabeled
    images carry the labels ``objective.label_unlabeled`` gives them once before training.
    """
    config.validate()
    device = torch.device(device)
    amp_dtype = AMP_DTYPES.get(device.type) if config.amp else None
    use_amp = amp_dtype is torch.float16  # loss scaling: float16 only (bfloat16 has float32's range)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model.to(device=device, memory_format=memory_format)
    if threat is None:
        threat = getattr(objective, "threat", None)
    if val_data is None and config.val_n > 0:
        data, val_data = split_holdout(data, config.val_n, config.seed)
    single_step = bool(getattr(objective, "single_step", False))
    co_on = (single_step if config.co_detection is None else config.co_detection) and val_data is not None
    if config.co_detection and (val_data is None or threat is None):
        raise RobustlabError("catastrophic-overfitting detection needs a validation set (val_n > 0) and a threat model")
    co_on = co_on and threat is not None
    uses_unlabeled = bool(getattr(objective, "uses_unlabeled", False))
    recipe = getattr(objective, "name", "the objective")
    if unlabeled is not None and not uses_unlabeled:
        raise RobustlabError(f"recipe {recipe!r} does not train on unlabeled data; use rst or uat with unlabeled images")
    if unlabeled is None and uses_unlabeled:
        raise RobustlabError(f"recipe {recipe!r} trains on extra unlabeled images: give them (--unlabeled SPEC)")
    unl_per_batch = unlabeled.per_batch(config.batch_size) if unlabeled is not None else 0
    labeled_per_batch = config.batch_size - unl_per_batch

    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:  # under torchrun every rank starts from rank 0's weights
        distributed.broadcast_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + labeled_per_batch - 1) // labeled_per_batch
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, make_lr_lambda(config.schedule, total, warmup, config.milestones, config.gamma)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)  # CUDA in practice (float16 is CUDA's AMP type)
    ema = ModelEMA(model, config.ema_decay) if config.ema_decay else None
    best = _Best()
    history = TrainHistory()
    identity = {
        "config": config.to_dict(),
        "objective": _json_normal(objective_config(objective)),
        "data": {"name": data.name, "train_n": len(data), "val_n": len(val_data) if val_data is not None else 0},
    }
    sampler = None
    if unlabeled is not None:
        identity["data"]["unlabeled"] = unlabeled.describe()
        sampler = UnlabeledSampler(len(unlabeled), config.seed)
    summary: dict[str, Any] = {"stop_reason": None, "catastrophic_overfitting": None, "co_monitor": co_on}
    start_epoch = 0
    within: dict[str, Any] | None = None  # a state saved inside an epoch: where and the epoch's sums so far

    if resume:
        if checkpoint_dir is None:
            raise RobustlabError("resume needs the checkpoint directory of the run to continue")
        loaded = train_state.load_state(checkpoint_dir)
        if loaded is None:
            raise RobustlabError(f"nothing to resume: no training state in {checkpoint_dir}")
        meta, tensors = loaded
        _check_same_run(meta, identity, checkpoint_dir)
        model.load_state_dict(train_state.take_module(tensors, "model"), strict=True)
        opt.load_state_dict(train_state.join_tensors(meta["optimizer"], tensors))
        sched.load_state_dict(meta["scheduler"])
        if use_amp and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        if ema is not None:
            ema.load_state_dict(train_state.take_module(tensors, "ema"), meta["ema_updates"])
        b = meta["best"]
        best.epoch, best.bad_epochs = b["epoch"], b["bad_epochs"]
        best.metric = -math.inf if b["metric"] is None else b["metric"]
        best_weights = train_state.take_module(tensors, "best")
        best.weights = best_weights or None
        history.extend(meta["history"])
        summary.update(meta.get("summary", {}))
        start_epoch = int(meta["epoch"])
        if sampler is not None:
            sampler.load_state_dict(meta["unlabeled_sampler"])
        if meta.get("within"):
            within = {**meta["within"], "log_sums": train_state.take_module(tensors, "log_sums"),
                      "rng": tensors.get("rng/cpu"), "cuda_rng": tensors.get("rng/cuda")}
        if meta.get("finished"):
            return _finish(history, summary, ema)

    def save(epoch: int, finished: bool, inside: dict[str, Any] | None = None) -> None:
        """The state after ``epoch`` epochs (and, with ``inside``, after ``inside["batch"]`` batches of
        the next one: its sums so far and the global RNG state go with it)."""
        if checkpoint_dir is None or not distributed.is_main():
            return
        tensors = train_state.module_tensors(model.state_dict(), "model")
        if inside is not None:
            tensors.update(train_state.module_tensors(inside.pop("log_sums"), "log_sums"))
            tensors["rng/cpu"] = torch.get_rng_state()
            if device.type == "cuda":
                tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
        if ema is not None:
            tensors.update(train_state.module_tensors(ema.state_dict(), "ema"))
        if best.weights is not None:
            tensors.update(train_state.module_tensors(best.weights, "best"))
        sched_state = sched.state_dict()  # lr_lambdas is [None] for a function: JSON-ready
        meta = {
            **identity,
            "optimizer": train_state.split_tensors(opt.state_dict(), "optim", tensors),
            "scheduler": sched_state,
            "scaler": scaler.state_dict() if use_amp else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "best": {"epoch": best.epoch, "metric": None if best.epoch is None else best.metric,
                     "bad_epochs": best.bad_epochs},
            "history": list(history),
            "summary": summary,
            "rng": {"seed": config.seed, "scheme": "per-epoch and per-batch generators from (seed, epoch, batch)"},
            "finished": finished,
            "within": inside,
            "steps_per_epoch": steps_per_epoch,
        }
        if sampler is not None:
            meta["unlabeled_sampler"] = sampler.state_dict()
        train_state.save_state(checkpoint_dir, epoch, tensors, meta, batch=inside["batch"] if inside else None)

    if unlabeled is not None:  # labels (pseudo-labels, or -1 for none) computed once, before training
        unl_labels = objective.label_unlabeled(unlabeled.x, device).to("cpu", torch.long)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    stop = None
    last_save = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        for epoch in range(start_epoch, config.epochs):
            torch.manual_seed(derive_seed(config.seed, epoch, DROPOUT_KEY))
            model.train()
            order = torch.randperm(len(data), generator=make_generator(config.seed, epoch))
            t0, loss_sum, seen = time.perf_counter(), 0.0, 0
            log_sums: dict[str, torch.Tensor] = {}
            lr_used = opt.param_groups[0]["lr"]
            first = 0
            if within is not None:  # resume inside this epoch, where the saved state left it
                first, loss_sum, seen, lr_used = within["batch"], within["loss_sum"], within["seen"], within["lr_used"]
                log_sums = {k: v.to(device) for k, v in within["log_sums"].items()}
                t0 -= within["seconds"]
                if within["rng"] is not None:
                    torch.set_rng_state(within["rng"])
                if within["cuda_rng"] is not None and device.type == "cuda":
                    torch.cuda.set_rng_state(within["cuda_rng"], device)
                within = None
            bar = show_progress(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                                enabled=False if rank else progress, leave=False)
            for i in bar:
                if isinstance(objective, Objective):
                    objective.set_progress(epoch, (epoch * steps_per_epoch + i) / total)
                idx = order[i * labeled_per_batch : (i + 1) * labeled_per_batch]
                uidx = sampler.draw(unl_per_batch) if sampler is not None else idx[:0]
                batch_n = len(idx) + len(uidx)
                if world > 1:  # data parallel: each rank takes its share of the global batch
                    idx, uidx = idx[rank::world], uidx[rank::world]
                x, y = data.batch(idx)  # in memory: x[idx], y[idx]; a streaming set decodes these
                if sampler is not None:  # labeled images first, then this batch's unlabeled ones
                    x, y = torch.cat([x, unlabeled.x[uidx]]), torch.cat([y, unl_labels[uidx]])
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                generator = make_generator(config.seed, epoch, i, device=device)
                if x.shape[0] == 0:  # a rank whose share of a short last batch is empty still joins the sum
                    loss, logs = sum((p * 0).sum() for p in params), {}
                else:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, logs = _call_objective(objective, model, x, y, generator)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RobustlabError(f"the training loss became {value} at epoch {epoch + 1}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if world > 1:  # the gradient of the global batch's mean loss, identical on every rank
                    distributed.average_gradients(params, x.shape[0] / batch_n)
                if config.grad_clip is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                lr_used = opt.param_groups[0]["lr"]
                scaler.step(opt)
                scaler.update()
                sched.step()
                if ema is not None:
                    ema.update(model)
                n = x.shape[0]
                loss_sum += value * n
                seen += n
                for key, v in logs.items():
                    v = v.detach().float() * n
                    log_sums[key] = log_sums[key] + v if key in log_sums else v
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                if (save_every is not None and i + 1 < steps_per_epoch
                        and time.perf_counter() - last_save >= save_every):
                    save(epoch, finished=False, inside={
                        "batch": i + 1, "loss_sum": loss_sum, "seen": seen, "lr_used": lr_used,
                        "seconds": round(time.perf_counter() - t0, 3), "log_sums": dict(log_sums)})
                    last_save = time.perf_counter()
            model.eval()
            if world > 1:  # batch-norm statistics were gathered on each rank's share: average them
                distributed.average_buffers(model)
            # Weight decay drives the weights of units that stopped learning into the subnormal range,
            # where CPUs compute many times slower and where they change no sum: zero them, with their
            # optimizer state (the same on every rank, and saved so, so a resumed run matches).
            state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
            zeroed = zero_subnormals_([*model.state_dict().values(), *state,
                                       *(ema.module.state_dict().values() if ema is not None else [])])
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / seen, "lr": lr_used,
                                      "seconds": round(time.perf_counter() - t0, 3), "subnormals_zeroed": zeroed}
            record.update({f"train_{k}": float(v) / seen for k, v in log_sums.items()})
            if val_data is not None:
                t1 = time.perf_counter()
                val = robust_validation(model, val_data, threat, config.val_steps, config.seed, device)
                record.update({f"val_{k}": v for k, v in val.items()})
                if ema is not None:
                    ev = robust_validation(ema.module, val_data, threat, config.val_steps, config.seed, device)
                    record.update({f"ema_val_{k}": v for k, v in ev.items()})
                record["val_seconds"] = round(time.perf_counter() - t1, 3)
                metric = val.get("robust_acc", val["clean_acc"])
                record["best"] = best.offer(epoch + 1, metric, model)
            history.append(record)
            if co_on:
                event = detect_catastrophic_overfitting(history, config.co_ratio, config.co_min_best)
                if event is not None:
                    record["catastrophic_overfitting"] = True
                    summary["catastrophic_overfitting"] = event
                    stop = "catastrophic_overfitting"
            if stop is None and config.patience and val_data is not None and best.bad_epochs >= config.patience:
                stop = "early_stopping"
            summary["stop_reason"] = stop
            if stop is None:
                save(epoch + 1, finished=False)
                last_save = time.perf_counter()
            if on_epoch:
                on_epoch(record)
            if stop is not None:
                break

    model.eval()
    last = history[-1]["epoch"] if history else 0
    if best.weights is not None and (config.restore_best or stop is not None) and best.epoch != last:
        model.load_state_dict(best.weights)
        summary["restored_best_epoch"] = best.epoch
    summary["best_epoch"] = best.epoch
    summary["epochs_run"] = last
    save(last, finished=True)
    return _finish(history, summary, ema)


def _finish(history: TrainHistory, summary: dict[str, Any], ema: ModelEMA | None) -> TrainHistory:
    """Attach the summary (with the validation numbers of the returned weights) and the EMA model."""
    returned = summary.get("restored_best_epoch") or summary.get("epochs_run")
    by_epoch = {r["epoch"]: r for r in history}
    rec = by_epoch.get(returned, {})
    summary["final_val"] = {k[4:]: v for k, v in rec.items() if k.startswith("val_") and k != "val_seconds"}
    last = history[-1] if history else {}
    summary["ema_val"] = {k[8:]: v for k, v in last.items() if k.startswith("ema_val_")}
    history.summary = summary
    history.ema = ema.module if ema is not None else None
    return history


def _check_same_run(meta: dict[str, Any], identity: dict[str, Any], where: Any) -> None:
    """A resumed run must be the same run: same config, objective and data sizes."""
    diffs = []
    for section in ("config", "objective", "data"):
        saved, now = meta.get(section), identity[section]
        if saved != now:
            if isinstance(saved, dict) and isinstance(now, dict):
                keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
                diffs.append(f"{section}: " + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys))
            else:
                diffs.append(section)
    if diffs:
        raise RobustlabError(f"cannot resume the run in {where}: it was started differently ({'; '.join(diffs)})")
