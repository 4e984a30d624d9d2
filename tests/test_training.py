"""Training: recipes as objectives of the one loop, resume, schedules, EMA, robust validation,
catastrophic-overfitting detection, the CLI. Tiny models on the embedded sklearn digits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.models import create_model
from robustlab.models.runtime import eval_mode
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel
from robustlab.training import (
    OBJECTIVES,
    TrainConfig,
    cpu_has_bf16,
    create_objective,
    detect_catastrophic_overfitting,
    robust_validation,
    train,
)
from robustlab.training import loop as training_loop
from robustlab.training import state as train_state
from robustlab.training.objectives import PGDAT
from robustlab.training.schedules import lr_factor

THREAT = ThreatModel("linf", 0.1)
RECIPES = ["standard", "pgd-at", "trades", "mart", "fgsm-at", "fast-at", "n-fgsm", "alp", "clp", "vat",
           "gradient-reg", "distillation", "curriculum-at"]
ADVERSARIAL = ["pgd-at", "trades", "mart", "fgsm-at", "fast-at", "n-fgsm", "alp", "vat", "curriculum-at"]


def _params(name: str, teacher: nn.Module) -> dict:
    """Cheap settings: 3 inner steps; distillation at a moderate temperature so a few steps move the
    loss measurably (published: 100)."""
    if name == "distillation":
        return {"teacher": teacher, "temperature": 4.0}
    return {"steps": 3} if "steps" in OBJECTIVES.get(name).defaults else {}


def _bn_net(dropout: float = 0.2) -> nn.Module:
    """A tiny digits net with BatchNorm and dropout (state the loop must carry across a resume)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(8 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def batch(digits_train):
    return digits_train.x[:128], digits_train.y[:128]


def test_registry_names_params_and_docs():
    assert set(RECIPES) <= set(OBJECTIVES.names())
    for name in RECIPES:
        cls = OBJECTIVES.get(name)
        doc = cls.__doc__ or ""
        if name != "standard":
            assert any(str(year) in doc for year in range(1990, 2030)), f"{name} docstring cites no paper"
        json.dumps(cls.defaults)
    obj = create_objective("trades", THREAT, beta=3, steps=4.0)  # coerced to the defaults' types
    assert obj.params == {"beta": 3.0, "steps": 4, "alpha": None, "eps_warmup": 0.0}
    assert json.loads(json.dumps(obj.config()))["threat"]["eps"] == 0.1
    with pytest.raises(RobustlabError, match="no parameter gamma"):
        create_objective("mart", THREAT, gamma=1.0)
    with pytest.raises(RobustlabError, match="needs a threat model"):
        create_objective("pgd-at")
    with pytest.raises(RobustlabError, match="unknown training recipe"):
        create_objective("pgd-at2", THREAT)
    with pytest.raises(RobustlabError, match="needs a teacher"):
        create_objective("distillation", teacher=3)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loss_is_finite_adversarial_and_decreases(name, batch, digits_model):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("digits_cnn").train()
    obj = create_objective(name, THREAT, **_params(name, digits_model))
    loss, logs = obj(model, x, y, make_generator(0, 1))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert all(v.dim() == 0 for v in logs.values())
    assert model.training  # the inner maximization restored the train mode
    ce = F.cross_entropy(model(x), y)
    if name == "standard":
        assert float(loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-6)
    else:  # the recipe's own term is there
        assert abs(float(loss.detach()) - float(ce.detach())) > 1e-5

    # A few SGD steps on the same batch lower the objective (same generator each time: same noise).
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if name != "distillation" else 1.0)
    first = None
    for _ in range(12):
        loss, _ = obj(model, x, y, make_generator(0, 1))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = float(obj(model, x, y, make_generator(0, 1))[0].detach())
    assert final < first - 1e-3, (first, final)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_examples_lie_in_the_threat_model_and_raise_the_loss(name, batch, digits_model):
    x, y = batch
    model = copy.deepcopy(digits_model).train()
    obj = create_objective(name, THREAT)
    x_adv = obj.perturb(model, x, y, make_generator(0, 2))
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    assert model.training
    reach = obj.reach() if name == "n-fgsm" else THREAT  # N-FGSM is not projected back onto eps
    assert bool(reach.contains(x_adv, x, tol=0).all())
    assert float((x_adv - x).abs().amax()) > 0.5 * THREAT.eps
    with torch.no_grad(), eval_mode(model):
        p_clean = F.softmax(model(x), dim=1)
        if name == "vat":  # the virtual adversarial direction beats a random one of the same size
            noise = THREAT.project(x + THREAT.eps * torch.randn(x.shape, generator=make_generator(0, 3)).sign(), x)
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="batchmean")
            kl_noise = F.kl_div(F.log_softmax(model(noise), 1), p_clean, reduction="batchmean")
            assert float(kl) > 2 * float(kl_noise)
        else:
            assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y)) + 0.1


def test_inner_maximization_does_not_move_batchnorm_statistics(batch):
    x, y = batch
    net = _bn_net().train()
    before = copy.deepcopy(net.state_dict())
    for name in ("pgd-at", "trades", "vat", "fgsm-at"):
        create_objective(name, THREAT).perturb(net, x, y, make_generator(0, 4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training


def test_eps_warmup_ramps_the_threat():
    obj = create_objective("pgd-at", ThreatModel("linf", 0.2), eps_warmup=0.5, steps=4)
    obj.set_progress(0, 0.1)
    assert obj.current_threat().eps == pytest.approx(0.04) and obj.step_size(2.5 / 4) == pytest.approx(0.025)
    obj.set_progress(3, 0.75)
    assert obj.current_threat().eps == 0.2


def test_curriculum_raises_the_attack_steps():
    obj = create_objective("curriculum-at", THREAT, steps=5, min_steps=1)
    seen = []
    for progress in (0.0, 0.25, 0.5, 0.75, 0.99):
        obj.set_progress(0, progress)
        seen.append(obj.current_steps())
    assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == 5


def test_schedules():
    total = 100
    assert lr_factor("cosine", 0, total) == 1.0 and lr_factor("cosine", total, total) == pytest.approx(0.0)
    assert lr_factor("constant", 57, total) == 1.0
    assert [lr_factor("multistep", s, total) for s in (0, 49, 50, 74, 75)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor("cyclic", 0, total) == 0.0 and lr_factor("cyclic", 40, total) == pytest.approx(1.0)
    assert lr_factor("cyclic", 70, total) == pytest.approx(0.5)
    warm = [lr_factor("cosine", s, total, warmup_steps=10) for s in range(12)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == 1.0 and warm[10] == 1.0 and warm[11] < 1.0


def test_state_round_trip_of_an_optimizer(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    meta = {"optimizer": train_state.split_tensors(opt.state_dict(), "optim", tensors)}
    train_state.save_state(tmp_path, 1, tensors, meta)
    meta2, tensors2 = train_state.load_state(tmp_path)
    restored = train_state.join_tensors(meta2["optimizer"], tensors2)
    opt2 = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(restored)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][k], v)
    assert not any(p.suffix == ".pt" for p in tmp_path.iterdir())


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted_bit_for_bit(digits_train, tmp_path):
    data = digits_train.subset(448)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, val_n=64, val_steps=3, ema_decay=0.9, seed=3)
    obj = create_objective("pgd-at", THREAT, steps=3)
    torch.manual_seed(0)
    straight = _bn_net()
    rng = torch.get_rng_state()
    h1 = train(straight, data, config, obj, progress=False, checkpoint_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is left alone

    def kill(record):
        if record["epoch"] == 2:
            raise _Killed

    torch.manual_seed(0)
    with pytest.raises(_Killed):
        train(_bn_net(), data, config, create_objective("pgd-at", THREAT, steps=3), progress=False,
              on_epoch=kill, checkpoint_dir=tmp_path / "b")
    torch.manual_seed(123)  # a different initialization: everything must come from the state
    resumed = _bn_net()
    h2 = train(resumed, data, config, create_objective("pgd-at", THREAT, steps=3), progress=False,
               checkpoint_dir=tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(h1.ema.state_dict().values(), h2.ema.state_dict().values()):
        assert torch.equal(a, b)
    drop = ("seconds", "val_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in h1] == [
        {k: v for k, v in r.items() if k not in drop} for r in h2
    ]
    # Resuming with another configuration is refused.
    with pytest.raises(RobustlabError, match="started differently.*lr"):
        train(_bn_net(), data, TrainConfig(**{**config.to_dict(), "lr": 0.1, "milestones": (0.5, 0.75)}),
              create_objective("pgd-at", THREAT, steps=3), checkpoint_dir=tmp_path / "b", resume=True)


def test_catastrophic_overfitting_rule():
    def hist(*rows):
        return [{"epoch": i + 1, "val_robust_acc": r, "train_adv_acc": t} for i, (r, t) in enumerate(rows)]

    event = detect_catastrophic_overfitting(hist((0.30, 0.40), (0.42, 0.45), (0.05, 0.90)))
    assert event is not None and event["best_epoch"] == 2 and event["epoch"] == 3 and "n-fgsm" in event["message"]
    assert detect_catastrophic_overfitting(hist((0.42, 0.45), (0.15, 0.50))) is None  # 36% of best: not below 30%
    assert detect_catastrophic_overfitting(hist((0.42, 0.45), (0.05, 0.20))) is None  # training accuracy fell too
    assert detect_catastrophic_overfitting(hist((0.08, 0.45), (0.00, 0.90))) is None  # never robust
    assert detect_catastrophic_overfitting(hist((0.42, 0.45))) is None
    # A steady slide (FGSM on MNIST at eps 0.3): three falls in a row to below half the best.
    slide = hist((0.172, 0.30), (0.150, 0.50), (0.096, 0.60), (0.060, 0.70))
    event = detect_catastrophic_overfitting(slide)
    assert event is not None and event["best_epoch"] == 1 and "each of the last 3 epochs" in event["message"]
    assert detect_catastrophic_overfitting(slide[:3]) is None  # two falls only
    assert detect_catastrophic_overfitting(hist((0.5, 0.3), (0.48, 0.5), (0.46, 0.6), (0.44, 0.7))) is None  # slow decay
    clean = [{"epoch": 1, "val_robust_acc": 0.4, "train_clean_acc": 0.5},
             {"epoch": 2, "val_robust_acc": 0.1, "train_clean_acc": 0.6}]
    assert detect_catastrophic_overfitting(clean) is not None


class _SyntheticCollapse(PGDAT):
    """PGD-AT for two epochs, then trains its adversarial examples towards a wrong class while
    keeping clean accuracy: robust accuracy collapses while training accuracy rises."""

    name = "test-collapse"
    single_step = True

    def loss(self, model, x, y, generator):
        x_adv = self.perturb(model, x, y, generator)
        if self.epoch < 2:
            with torch.no_grad(), eval_mode(model):
                clean = (model(x).argmax(1) == y).float().mean()
            return F.cross_entropy(model(x_adv), y), {"clean_acc": clean}
        logits = model(x)
        flipped = F.cross_entropy(model(x_adv), (y + 1) % 10)
        return F.cross_entropy(logits, y) + 3 * flipped, {"clean_acc": (logits.argmax(1) == y).float().mean()}


def test_catastrophic_overfitting_stops_and_restores_the_best_weights(digits_train):
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    snapshots = {}

    def keep(record):
        if record.get("best"):
            snapshots[record["epoch"]] = copy.deepcopy(model.state_dict())

    config = TrainConfig(epochs=6, batch_size=32, lr=0.05, schedule="constant", val_n=128, val_steps=5)
    h = train(model, digits_train.subset(768), config, _SyntheticCollapse(ThreatModel("linf", 0.15), steps=3),
              progress=False, on_epoch=keep)
    s = h.summary
    assert s["stop_reason"] == "catastrophic_overfitting" and s["co_monitor"]
    assert len(h) < 6 and h[-1]["catastrophic_overfitting"] is True
    assert "n-fgsm" in s["catastrophic_overfitting"]["message"]
    best = s["restored_best_epoch"]
    assert best == s["catastrophic_overfitting"]["best_epoch"] < h[-1]["epoch"]
    assert all(torch.equal(v, snapshots[best][k]) for k, v in model.state_dict().items())
    assert s["final_val"]["robust_acc"] == h[best - 1]["val_robust_acc"] > 3 * h[-1]["val_robust_acc"]


def test_pgd_at_beats_standard_training_and_ema_is_kept(digits_train, digits_test):
    threat = ThreatModel("linf", 0.15)
    test = digits_test.subset(250)
    robust = {}
    for name in ("standard", "pgd-at"):
        torch.manual_seed(0)
        model = create_model("digits_cnn")
        config = TrainConfig(epochs=4, batch_size=64, lr=0.1, ema_decay=0.99 if name == "pgd-at" else None,
                             val_n=100, val_steps=5, restore_best=False)
        h = train(model, digits_train, config, create_objective(name, threat, **({"steps": 3} if name != "standard" else {})),
                  progress=False)
        robust[name] = robust_validation(model, test, threat, steps=10, seed=1)["robust_acc"]
    assert robust["pgd-at"] > robust["standard"] + 0.25, robust  # measured: 0.51 vs 0.13 (seed 0), 0.53 vs 0.11
    # The weight average is a separate model, different from the raw weights, evaluated every epoch.
    assert h.ema is not None and not h.ema.training
    assert any(not torch.equal(a, b) for a, b in zip(h.ema.parameters(), model.parameters()))
    assert all(0 <= r["ema_val_robust_acc"] <= r["ema_val_clean_acc"] <= 1 for r in h)
    assert h.summary["ema_val"]["robust_acc"] == h[-1]["ema_val_robust_acc"]


def test_amp_trains_in_bfloat16_on_cpu_and_channels_last_trains(digits_train):
    data = digits_train.subset(256)
    dtypes = []

    def spy(model, x, y):  # records the dtype the model computes in during training steps
        logits = model(x)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), y)

    states, losses = [], []
    for extra in ({}, {"amp": True}, {"channels_last": True}):
        torch.manual_seed(0)
        model = create_model("digits_cnn")
        dtypes.clear()
        h = train(model, data, TrainConfig(epochs=2, batch_size=64, grad_clip=1.0, **extra), spy, progress=False)
        assert set(dtypes) == {torch.bfloat16 if extra.get("amp") else torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
        states.append(model.state_dict())
        losses.append([r["loss"] for r in h])
    # bfloat16 rounds differently: different weights, the same course of training.
    assert any(not torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
    assert all(math.isfinite(v) for v in losses[1]) and losses[1][1] < losses[1][0]
    assert abs(losses[1][1] - losses[0][1]) < 0.1 * losses[0][1], losses
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(states[0].values(), states[2].values()))


class _WithIdleWeights(nn.Module):
    """_bn_net plus a parameter no loss reaches, holding subnormal numbers: what weight decay leaves of
    the weights of units that stopped learning."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _bn_net()
        self.idle = nn.Parameter(torch.full((100,), 1e-39))

    def forward(self, x):
        return self.net(x)


def test_subnormal_weights_are_zeroed_each_epoch(digits_train):
    data = digits_train.subset(256)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, weight_decay=5e-4, seed=0)
    torch.manual_seed(0)
    model = _WithIdleWeights()
    torch.manual_seed(0)
    plain = _bn_net()
    history = train(model, data, config, progress=False)
    train(plain, data, config, progress=False)
    assert [r["subnormals_zeroed"] for r in history] == [100, 0]
    assert torch.equal(model.idle, torch.zeros(100))
    # Nothing else changed: the same weights as the same net trained without them.
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("flags, expected", [("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                             ("fpu sse avx2 avx512f", False), (None, None)])
def test_amp_warns_on_a_cpu_without_bfloat16_units(tmp_path, monkeypatch, capsys, flags, expected):
    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(training_loop, "CPUINFO", info)
    assert cpu_has_bf16() is expected
    args = ["train", "--model", "digits_cnn", "--data", "digits", "--n", "64", "--epochs", "1", "--amp",
            "--out", str(tmp_path / "m.safetensors"), "--device", "cpu"]
    assert main(args) == 0
    warned = "--amp on this CPU means bfloat16 without hardware support" in capsys.readouterr().err
    assert warned == (expected is False)


def test_cli_trains_a_recipe_and_records_it(tmp_path, capsys):
    out = tmp_path / "fast.safetensors"
    args = ["train", "--model", "digits_cnn", "--data", "digits", "--n", "400", "--epochs", "2", "--batch-size", "64",
            "--recipe", "fast-at:alpha=0.12", "--norm", "linf", "--eps", "0.1", "--val-n", "64", "--val-steps", "3",
            "--ema", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    t = card["training"]
    assert t["recipe"] == "fast-at" and t["recipe_params"]["alpha"] == 0.12
    assert t["threat"]["eps"] == 0.1 and len(t["history"]) == 2 and t["seconds"] > 0
    assert t["validation"]["n"] == 64 and 0 <= card["robust_accuracy"]["linf:0.1"] <= t["validation"]["clean_accuracy"]
    assert t["summary"]["co_monitor"] is True and card["dataset"] == "digits:train[336]"
    assert (tmp_path / "fast_ema.safetensors").is_file() and (tmp_path / "fast.train" / "state.json").is_file()
    weights = load_file(str(out))
    # Resuming a finished run gives back its weights. (Compared as tensors: safetensors writes its
    # metadata in a per-process order, so the file bytes may differ.)
    assert main([*args, "--resume"]) == 0
    assert all(torch.equal(v, load_file(str(out))[k]) for k, v in weights.items())
    capsys.readouterr()
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--recipe", "trades", "--out", str(out)]) == 2
    assert "give --eps" in capsys.readouterr().err
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--recipe", "nope", "--eps", "0.1",
                 "--out", str(out)]) == 2
    assert "unknown training recipe" in capsys.readouterr().err
