"""Shared pieces of the benchmarks: where the real data is, reference models (trained once and cached
under ``benchmarks/.cache/``), and honest timing (the physical floor, interleaved repeats, medians).

Data: ``../shared/data`` next to the repository root, or ``$ROBUSTLAB_SHARED_DATA``.
Models (``get_model(key)``), each a robustlab checkpoint (safetensors + model card):

- ``mnist_std``: SmallCNN, standard training on MNIST train;
- ``mnist_pgd``: the same SmallCNN fine-tuned with PGD adversarial training at Linf eps 0.3, so that
  robust accuracy is far from 0 and a weaker attack shows up as a higher number;
- ``cifar_std``: cifar_cnn, standard training on the 8,068-image CIFAR-10 train set of the shared
  data (flips and crops);
- ``cifar_at``: the same cifar_cnn fine-tuned with PGD adversarial training at Linf eps 8/255;
- ``scenes_seg``: the seg_unet segmentation network (11 per-pixel classes), standard training on
  3,000 scenes of ``scenes-mnist`` (robustlab.data.scenes, made from MNIST train).

A cached model is reused only if its card records the same training recipe; change a recipe and the
model is retrained on the next run.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results"
DATA_ENV = "ROBUSTLAB_SHARED_DATA"


# ---------------------------------------------------------------------- environment


def set_threads(n: int) -> None:
    """Fix the intra-op thread count for the whole run (timings are only comparable at a fixed count)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def shared_data_dir() -> Path:
    """The folder with ``mnist_*.npz`` and ``cifar10_*.npz``; exits with a clear message if absent."""
    env = os.environ.get(DATA_ENV, "").strip()
    root = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    needed = ["mnist_train.npz", "mnist_test.npz", "cifar10_train.npz", "cifar10_test.npz"]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        sys.exit(
            f"benchmark data not found: {', '.join(missing)} missing in {root.resolve()}.\n"
            f"Put the shared data sets there (../shared/data next to the repository) or set {DATA_ENV} "
            f"to the folder that holds them."
        )
    return root


def load_split(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 NCHW in [0, 1], y int64) of ``dataset`` (mnist | cifar10 | scenes_mnist: y (N, H, W))
    ``split`` from the shared data."""
    from robustlab.data import load_dataset

    data = load_dataset(dataset, split, root=shared_data_dir())
    return data.x, data.y


def environment() -> str:
    """One line saying what the numbers were measured on."""
    import platform

    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s) "
        f"({platform.processor() or platform.machine()}), python {platform.python_version()}"
    )


# ---------------------------------------------------------------------- reference models


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _augment_cifar(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random 32x32 crop of the 4-pixel zero-padded image, per sample."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def _pgd_objective(eps: float, steps: int, alpha: float, ramp_steps: int, seed: int) -> Callable:
    """Madry-style adversarial training loss with robustlab's own PGD (random start, CE); eps ramps
    up linearly over the first ``ramp_steps`` optimizer steps. The attack runs in eval mode and leaves
    the model in train mode for the update."""
    from robustlab.attacks import create_attack
    from robustlab.threat import ThreatModel

    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0}

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        frac = min(1.0, (state["step"] + 1) / max(1, ramp_steps))
        state["step"] += 1
        e = eps * frac
        attack = create_attack("pgd", ThreatModel("linf", e), steps=steps, alpha=alpha * frac)
        with robustlab_runtime(model, x):  # as the attack ran when these models were trained
            x_adv = attack.run(model, x, y, gen).x_adv
        return F.cross_entropy(model(x_adv), y)

    return objective


def _cifar_objective(seed: int) -> Callable:
    gen = torch.Generator().manual_seed(seed)

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(_augment_cifar(x, gen)), y)

    return objective


@dataclass(frozen=True)
class Recipe:
    """How a reference model is made. ``init`` names another reference model to start from."""

    key: str
    architecture: str
    dataset: str
    train_subset: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    arch_kwargs: dict = field(default_factory=dict)
    init: str | None = None
    adversarial: dict | None = None  # eps, steps, alpha, ramp_fraction (Linf PGD training)
    augment: bool = False
    seed: int = 0
    objective: str | None = None  # a robustlab training recipe spec (e.g. "mixup"), in place of CE
    teacher: str | None = None  # the reference model given as the recipe's teacher (distillation)
    defense: str | None = None  # trained behind this defense (an encoding: thermometer); the card lists it

    def to_dict(self) -> dict[str, Any]:
        """The recipe, with the recipe of the model it starts from (so changing that retrains this)."""
        # fields added later are left out when unset (or at their default), so the cached models made
        # before them still match
        out = {k: getattr(self, k) for k in self.__dataclass_fields__
               if not (k in ("objective", "teacher", "defense") and getattr(self, k) is None)}
        if out["weight_decay"] == 5e-4:
            del out["weight_decay"]
        if self.init:
            out["init_recipe"] = RECIPES[self.init].to_dict()
        if self.teacher:
            out["teacher_recipe"] = RECIPES[self.teacher].to_dict()
        return out


RECIPES = {
    r.key: r
    for r in (
        Recipe("mnist_std", "smallcnn", "mnist", train_subset=30000, epochs=2, batch_size=128, lr=0.05),
        Recipe(
            "mnist_pgd", "smallcnn", "mnist", train_subset=15000, epochs=1, batch_size=128, lr=0.01,
            schedule="constant", init="mnist_std",
            adversarial={"eps": 0.3, "steps": 5, "alpha": 0.1, "ramp_fraction": 0.3},
        ),
        Recipe("cifar_std", "cifar_cnn", "cifar10", train_subset=0, epochs=5, batch_size=128, lr=0.05, augment=True),
        Recipe(
            "cifar_at", "cifar_cnn", "cifar10", train_subset=0, epochs=2, batch_size=128, lr=0.02,
            init="cifar_std", adversarial={"eps": 8 / 255, "steps": 3, "alpha": 3 / 255, "ramp_fraction": 0.2},
        ),
        # A cheaper adversarially trained CIFAR-10 model (2,000 images, one epoch) for the fidelity matrix,
        # whose budget on 2 shared CPU cores does not allow cifar_at's training.
        Recipe(
            "cifar_at_small", "cifar_cnn", "cifar10", train_subset=2000, epochs=1, batch_size=128, lr=0.02,
            init="cifar_std", adversarial={"eps": 8 / 255, "steps": 3, "alpha": 3 / 255, "ramp_fraction": 0.2},
        ),
        # Segmentation (per-pixel labels): scenes of MNIST digits, 64x64, 11 classes with the background.
        Recipe("scenes_seg", "seg_unet", "scenes_mnist", train_subset=3000, epochs=6, batch_size=32, lr=0.003,
               optimizer="adam", weight_decay=0.0, arch_kwargs={"width": 16, "depth": 3}),
        # Models the trained defenses need (benchmarks/defenses_trained.py): small, stated there.
        Recipe("mnist_therm", "smallcnn", "mnist", train_subset=20000, epochs=1, batch_size=128, lr=0.05,
               defense="thermometer:levels=16"),
        Recipe("mnist_mixup", "smallcnn", "mnist", train_subset=10000, epochs=1, batch_size=128, lr=0.02,
               init="mnist_std", objective="mixup"),
        Recipe("mnist_kwta", "smallcnn", "mnist", train_subset=10000, epochs=1, batch_size=128, lr=0.02,
               init="mnist_std", arch_kwargs={"activation": "kwta:0.1"}),
        # Distillation at T = 100: the cross-entropy at T has 1/T-sized gradients that do not shrink as the
        # model gets the labels right (the softmax at T stays near uniform until the logits reach ~T), so
        # SGD has no working learning rate in a short run: 0.05 barely moves (12% clean after 79 steps),
        # 0.5 crawls (27%), 1.5 and the 100x-scaled 5.0 blow the weights up (15%, 11%). Adam is invariant
        # to the 1/T scale: 77% in the same 79 steps (benchmarks/results/defenses_trained_distillation.txt).
        Recipe("mnist_distill_t", "smallcnn", "mnist", train_subset=20000, epochs=2, batch_size=128, lr=1e-3,
               optimizer="adam", weight_decay=0.0, objective="distillation:temperature=100"),
        Recipe("mnist_distill", "smallcnn", "mnist", train_subset=20000, epochs=2, batch_size=128, lr=1e-3,
               optimizer="adam", weight_decay=0.0, objective="distillation:temperature=100",
               teacher="mnist_distill_t"),
        # Double backpropagation at weight 10: SGD at lr 0.02 (Nesterov) diverges within 5 steps (the
        # penalty's parameter gradients reach norm 30-300); Adam at 5e-4 stays finite.
        Recipe("mnist_igr", "smallcnn", "mnist", train_subset=10000, epochs=1, batch_size=128, lr=5e-4,
               optimizer="adam", weight_decay=0.0, init="mnist_std", objective="gradient-reg:weight=10"),
        # MMC (Max-Mahalanobis centers, radius 10): standard-trained as mnist_std, and fine-tuned with
        # adversarial training on the MMC loss as mnist_pgd is with cross-entropy (same images, epochs,
        # steps, step size and epsilon warm-up over the first 30% of the run). The MMC loss is about C^2 / 2
        # = 50 where cross-entropy is about 2 (its gradients as much larger): learning rates a tenth of CE's
        # (0.05 diverges)
        Recipe("mnist_mmc", "smallcnn", "mnist", train_subset=30000, epochs=2, batch_size=128, lr=0.005,
               objective="mmc:radius=10", arch_kwargs={"head": "mmc:10"}),
        Recipe("mnist_mmc_pgd", "smallcnn", "mnist", train_subset=15000, epochs=1, batch_size=128, lr=0.001,
               schedule="constant", init="mnist_mmc", objective="mmc-at:radius=10,steps=5,alpha=0.1,eps_warmup=0.3",
               arch_kwargs={"head": "mmc:10"}, adversarial={"eps": 0.3}),
        Recipe("cifar_therm", "cifar_cnn", "cifar10", train_subset=0, epochs=3, batch_size=128, lr=0.05,
               augment=True, defense="thermometer:levels=16"),
        Recipe("cifar_mixup", "cifar_cnn", "cifar10", train_subset=0, epochs=1, batch_size=128, lr=0.02,
               init="cifar_std", objective="mixup"),
        Recipe("cifar_kwta", "cifar_cnn", "cifar10", train_subset=0, epochs=1, batch_size=128, lr=0.02,
               init="cifar_std", arch_kwargs={"activation": "kwta:0.1"}),
        Recipe("cifar_distill_t", "cifar_cnn", "cifar10", train_subset=0, epochs=3, batch_size=128, lr=1e-3,
               optimizer="adam", weight_decay=0.0, objective="distillation:temperature=100"),
        Recipe("cifar_distill", "cifar_cnn", "cifar10", train_subset=0, epochs=3, batch_size=128, lr=1e-3,
               optimizer="adam", weight_decay=0.0, objective="distillation:temperature=100",
               teacher="cifar_distill_t"),
        Recipe("cifar_igr", "cifar_cnn", "cifar10", train_subset=4000, epochs=1, batch_size=128, lr=5e-4,
               optimizer="adam", weight_decay=0.0, init="cifar_std", objective="gradient-reg:weight=10"),
    )
}


def _checkpoint_path(key: str) -> Path:
    return CACHE / f"{key}.safetensors"


def _clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / y.numel()  # per-pixel labels (N, H, W): the pixel accuracy


def get_model(key: str) -> tuple[nn.Module, dict[str, Any]]:
    """The reference model ``key`` in eval mode, and its card as a dict (training recipe, clean test
    accuracy, training seconds). Trained on first use (minutes on CPU), then loaded from the cache."""
    from robustlab.defenses import DefendedModel, build_defenses
    from robustlab.models import ModelCard, create_model, load_checkpoint, save_checkpoint
    from robustlab.params import parse_spec
    from robustlab.training import TrainConfig, create_objective, train

    recipe = RECIPES[key]
    path = _checkpoint_path(key)
    if path.is_file():
        try:
            model, card = load_checkpoint(path)
            if card.training.get("recipe") == recipe.to_dict():
                return model.eval(), card.to_dict()
            log(f"[{key}] cached model was made with another recipe; retraining")
        except Exception as exc:  # a broken cache entry: retrain rather than fail
            log(f"[{key}] cannot load the cached model ({exc}); retraining")

    from robustlab.data import ImageDataset, load_dataset

    data = load_dataset(recipe.dataset, "train", root=shared_data_dir())
    if recipe.train_subset:
        data = data.subset(recipe.train_subset)
    data = data if data.dense else ImageDataset(recipe.dataset, "train", data.x, data.y, [str(i) for i in range(10)])
    y = data.y
    num_classes = data.num_classes
    torch.manual_seed(recipe.seed)
    defenses = build_defenses([recipe.defense]) if recipe.defense else []
    channels = int(data.x.shape[1])
    for d in defenses:  # an encoding in front (thermometer) changes what the architecture takes
        channels = d.output_channels(channels)
    # an encoding's 0/1 channels are fed as they are (no per-channel statistics exist for them)
    norm = {"mean": (0.0,) * channels, "std": (1.0,) * channels} if defenses else {}
    model = create_model(recipe.architecture, num_classes=num_classes, in_channels=channels, **norm,
                         **recipe.arch_kwargs)
    if recipe.init:
        base, _ = get_model(recipe.init)
        model.load_state_dict(base.state_dict())
    trained = DefendedModel(model, defenses) if defenses else model
    config = TrainConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, optimizer=recipe.optimizer,
        schedule=recipe.schedule, seed=recipe.seed, weight_decay=recipe.weight_decay,
    )
    if recipe.adversarial and recipe.objective:  # a robustlab adversarial recipe at the recipe's Linf eps
        from robustlab.threat import ThreatModel

        name, params = parse_spec(recipe.objective)
        objective = create_objective(name, ThreatModel("linf", recipe.adversarial["eps"]), **params)
    elif recipe.adversarial:
        adv = recipe.adversarial
        total = recipe.epochs * math.ceil(len(y) / recipe.batch_size)
        objective = _pgd_objective(adv["eps"], adv["steps"], adv["alpha"], int(adv["ramp_fraction"] * total), recipe.seed)
    elif recipe.objective:
        name, params = parse_spec(recipe.objective)
        if recipe.teacher:
            params["teacher"] = get_model(recipe.teacher)[0]
        objective = create_objective(name, **params)
    elif recipe.augment:
        objective = _cifar_objective(recipe.seed)
    else:
        from robustlab.training.loop import standard_objective as objective
    log(f"[{key}] training {recipe.architecture} on {len(y)} {recipe.dataset} images ({recipe.epochs} epoch(s)) ...")
    t0 = time.perf_counter()
    history = train(trained, data, config, objective=objective, progress=None, on_epoch=lambda r: log(f"[{key}]   {r}"))
    seconds = time.perf_counter() - t0
    model.eval()
    x_test, y_test = load_split(recipe.dataset, "test")
    clean = _clean_accuracy(trained.eval(), x_test, y_test)
    log(f"[{key}] trained in {seconds:.0f} s; clean test accuracy {clean:.4f} on {len(y_test)} images")
    card = ModelCard.for_architecture(
        recipe.architecture,
        num_classes=num_classes,
        in_channels=channels,
        **norm,
        arch_kwargs=dict(recipe.arch_kwargs),
        dataset=recipe.dataset,
        training={"recipe": recipe.to_dict(), "seconds": round(seconds, 1), "history": history,
                  "threads": torch.get_num_threads()},
        clean_accuracy=clean,
        notes=f"robustlab benchmark reference model {key!r} (benchmarks/common.py)",
    )
    save_checkpoint(model, path, card)
    _, saved = load_checkpoint(path)
    return model, saved.to_dict()


# ---------------------------------------------------------------------- timing


def input_gradient_floor(model: nn.Module, points: list[torch.Tensor], y: torch.Tensor) -> None:
    """The physical floor of a k-step gradient attack: one forward + backward to the input only at
    each of the k points (batches) given -- the iterates the attack visits (see ``pgd_iterates``).

    The points matter: CPU kernels (max-pooling, convolutions) can run faster on clean MNIST digits,
    which are 80% exact zeros, than on perturbed images, and no attack evaluates the clean batch k
    times.
    """
    for x in points:
        x_req = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_req), y, reduction="sum")
        torch.autograd.grad(loss, x_req)


def pgd_iterates(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Any, alpha: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """The k points at which PGD (random start, CE, no early stopping) takes its gradients: x_0 is the
    random start, x_{j+1} = project(x_j + alpha * steepest step). Untimed; feeds the floor."""
    points = [threat.random_init(x, generator, radius="uniform")]
    while len(points) < steps:
        x_req = points[-1].detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_req), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_req)
        points.append(threat.project(points[-1] + threat.steepest_step(grad, alpha), x).detach())
    return points


def forward_pass(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward pass (no graph): what it costs to learn which returned points are adversarial."""
    with torch.no_grad():
        return model(x).argmax(1)


def time_interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: bool = False) -> dict[str, dict]:
    """Run every contender ``repeats`` times, interleaved (round r runs them in a rotated order, so
    slow drifts of the machine hit all alike). Returns {name: {"cpu": median process CPU seconds,
    "wall": median wall seconds, "cpu_min": fastest repeat, "wall_min": ..., "cpu_all": [...],
    "wall_all": [...]}}. Interference from other processes only ever adds time, so the fastest of
    several repeats is the steadiest estimate of what the code itself costs.

    CPU time is the steadier measure on a shared machine (other processes stretch wall time, not
    this process's CPU time); with one thread the two agree on an idle machine.
    """
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c0, w0 = time.process_time(), time.perf_counter()
            contenders[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        name: {"cpu": statistics.median(cpu[name]), "wall": statistics.median(wall[name]),
               "cpu_min": min(cpu[name]), "wall_min": min(wall[name]), "cpu_all": cpu[name], "wall_all": wall[name]}
        for name in names
    }


def write_report(report: str, path: Path) -> None:
    """Print the report and write it to ``path`` (its folder created if needed)."""
    print(report, end="")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
    log(f"report written to {path}")


class Counter(nn.Module):
    """The model, counting the images it is given (all, and those with a graph to the input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0
        self.grad_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        if x.requires_grad:
            self.grad_images += x.shape[0]
        return self.model(x)


def robustlab_runtime(model: nn.Module, x: torch.Tensor):
    """The runtime robustlab's evaluation runs attacks in (``fast_runtime``: channels-last and
    subnormal weights read as zero, on CPU), for a direct ``attack.run`` on ``model``: what the
    benchmarks time robustlab in. Probed with one image of ``x``, so the probe costs next to nothing
    in a timing, and on the model inside a :class:`Counter`, so it is no counted query."""
    from robustlab.models.runtime import fast_runtime

    return fast_runtime(model.model if isinstance(model, Counter) else model, x[:1])


class ModelClock(nn.Module):
    """The model, adding up the process CPU seconds spent inside it: its forward passes, and the
    backward passes from its logits to its input (between a hook on the logits, which fires when
    their gradient arrives, and a hook on a view of the input, which fires when the input's gradient
    is complete). What a tool spends outside these is its own overhead; the model time is what any
    tool making the same model calls would spend at least."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seconds = 0.0
        self._backward_start = 0.0

    def _start(self, grad: torch.Tensor) -> None:
        self._backward_start = time.process_time()

    def _end(self, grad: torch.Tensor) -> None:
        self.seconds += time.process_time() - self._backward_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.process_time()
        track = torch.is_grad_enabled() and x.requires_grad
        if track:
            x = x.view_as(x)
            x.register_hook(self._end)
        out = self.model(x)
        if track and out.requires_grad:
            out.register_hook(self._start)
        self.seconds += time.process_time() - t0
        return out


def sign_test(only_peer: int, only_ours: int) -> float:
    """One-sided exact sign test: the chance of the peer winning at least ``only_peer`` of the
    ``only_peer + only_ours`` examples where the two disagree, if both were equally strong."""
    from scipy.stats import binomtest

    n = only_peer + only_ours
    return 1.0 if n == 0 else float(binomtest(only_peer, n, 0.5, alternative="greater").pvalue)


def fidelity_status(gap: float, slack: float, only_peer: int, only_ours: int) -> tuple[str, float]:
    """PASS if robustlab's robust accuracy is at most ``slack`` points above the peer's; above it,
    NOISE when the examples only the peer breaks do not significantly outnumber those only robustlab
    breaks (one-sided sign test p >= 0.05: a different random draw, not a weaker attack), else FAIL."""
    p_value = sign_test(only_peer, only_ours)
    if gap <= slack:
        return "PASS", p_value
    return ("NOISE" if p_value >= 0.05 else "FAIL"), p_value


def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
