"""The CUDA paths, where there is a GPU (CI has none: the module skips). Every attack, the evaluation
runner and mixed-precision training run on the GPU; attacks and evaluations agree with the CPU up to
rounding and random draws."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from robustlab.attacks import ATTACKS, create_attack
from robustlab.defenses import apply_defenses
from robustlab.eval.runner import EvalOptions, evaluate
from robustlab.eval.store import ResultsStore
from robustlab.models import ModelCard, create_model, save_checkpoint
from robustlab.threat import ThreatModel
from robustlab.training import OBJECTIVES, TrainConfig, accuracy, create_objective, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: these tests need a GPU")

CUDA = torch.device("cuda")
# Radii at which the digits model of conftest is far from robust (8x8 images, 64 pixels).
EPS = {"linf": 0.15, "l2": 1.5, "l1": 6.0, "l0": 10}
# Smaller budgets where the defaults take long; strength is checked on CPU by each attack's own tests.
BUDGETS = {"cw": {"binary_steps": 4, "steps": 50}, "ead": {"binary_steps": 4, "steps": 50},
           "hopskipjump": {"queries": 1000}, "square": {"queries": 1000}, "nes": {"steps": 50},
           "spsa": {"steps": 50}, "sparse-rs": {"queries": 300}}


@pytest.fixture(scope="module")
def surrogate(digits_model, tmp_path_factory) -> str:
    """The digits model as a checkpoint, for the transfer attack to craft on."""
    path = tmp_path_factory.mktemp("cuda") / "surrogate.safetensors"
    save_checkpoint(digits_model, path, ModelCard.for_architecture("digits_cnn", num_classes=10))
    return str(path)


class Decode(torch.nn.Module):
    """A thermometer code (N, C * levels, H, W) back to the image (bucket / levels), so the digits model
    runs behind the encoding."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return code.unflatten(1, (-1, self.levels)).mean(dim=2)


def attacked_model(name: str, digits_model: torch.nn.Module) -> torch.nn.Module:
    """The digits model, behind a 16-level thermometer for ls-pga (which attacks an encoding)."""
    if name != "ls-pga":
        return digits_model
    return apply_defenses(torch.nn.Sequential(Decode(16), digits_model), ["thermometer:levels=16"]).eval()


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_runs_on_cuda_as_on_cpu(name, digits_model, digits_test, surrogate):
    cls = ATTACKS.get(name)
    threat = ThreatModel(cls.norms[0], EPS[cls.norms[0]])
    params = {**BUDGETS.get(name, {}), **({"surrogate": surrogate} if name == "transfer" else {})}
    x, y = digits_test.x[:64], digits_test.y[:64]
    cpu_model = attacked_model(name, digits_model)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    results = {}
    for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        gen = torch.Generator(device=device).manual_seed(0)
        results[device] = create_attack(name, threat, **params).run(model, x.to(device), y.to(device), gen)
    r = results["cuda"]
    assert r.x_adv.device.type == r.success.device.type == "cuda"
    if not cls.minimum_norm:  # those may return points beyond eps (the runner counts them robust)
        assert bool(threat.contains(r.x_adv, x.to(CUDA)).all())
    assert bool(((r.x_adv >= 0) & (r.x_adv <= 1)).all())
    with torch.no_grad():
        assert torch.equal(r.success, gpu_model(r.x_adv).argmax(1) != y.to(CUDA))
    # The same algorithm with other rounding and other random draws: success rates within 10 of 64.
    rates = {d: float(res.success.float().mean()) for d, res in results.items()}
    assert rates["cuda"] > 0.3 and abs(rates["cuda"] - rates["cpu"]) <= 10 / 64, rates


def test_evaluation_on_cuda_agrees_with_cpu(digits_model, digits_test, tmp_path):
    """Clean accuracy, the ensemble, every sanity check (large-eps, gradients, binarization) on the GPU."""
    linf = ThreatModel("linf", EPS["linf"])
    attacks = [create_attack("apgd-ce", linf, steps=20), create_attack("square", linf, queries=300)]
    data = digits_test.subset(200)
    out = {}
    for device in ("cpu", "cuda"):
        with ResultsStore(tmp_path / f"{device}.db") as store:
            res = evaluate(copy.deepcopy(digits_model).to(device), data, attacks, store, device=device,
                           options=EvalOptions(eps_grid=(0.05,), steps_grid=(), sanity=True))
            out[device] = res, store.get_run(res.run_id)
    (cpu, _), (gpu, run) = out["cpu"], out["cuda"]
    assert run["environment"]["device"].startswith("cuda") and run["environment"]["gpu"]
    assert gpu.summary["clean_accuracy"] == cpu.summary["clean_accuracy"]
    assert abs(gpu.summary["robust_accuracy"] - cpu.summary["robust_accuracy"]) <= 0.05
    # The black-box check counts Square's late successes, which depend on the random draws.
    statuses = [{c["name"]: c["status"] for c in res.checks if c["name"] != "black-box"} for res in (cpu, gpu)]
    assert statuses[0] == statuses[1] and "fail" not in statuses[1].values()


# Dual-BN and the recipes with unlabeled data need more set-up (their loop is the same).
SKIPPED = ("dual-bn", "rst", "uat")


@pytest.mark.parametrize("name", [n for n in OBJECTIVES.names() if n not in SKIPPED])
def test_mixed_precision_training_on_cuda_learns_like_float32_on_cpu(name, digits_train, digits_test, digits_model):
    """float16 autocast with loss scaling and channels-last on the GPU; float32 on the CPU."""
    threat = ThreatModel("linf", 0.1)
    acc = {}
    for device in ("cpu", "cuda"):
        params: dict = {}
        if name == "distillation":
            params = {"teacher": copy.deepcopy(digits_model).to(device), "temperature": 4.0}
        elif "steps" in OBJECTIVES.get(name).defaults:
            params["steps"] = 3
        torch.manual_seed(0)
        model = create_model("digits_cnn", num_classes=10)
        # Distillation's soft targets at temperature T give gradients T times smaller: a larger rate.
        config = TrainConfig(epochs=4, batch_size=64, lr=0.2 if name == "distillation" else 0.05, seed=0,
                             amp=device == "cuda", channels_last=device == "cuda")
        history = train(model, digits_train, config, create_objective(name, threat, **params), device=device,
                        progress=False)
        assert all(math.isfinite(r["loss"]) for r in history)
        assert next(model.parameters()).device.type == device
        assert all(p.dtype == torch.float32 for p in model.parameters())
        acc[device] = accuracy(model, digits_test)
    assert acc["cuda"] > 0.6 and abs(acc["cuda"] - acc["cpu"]) <= 0.1, acc
