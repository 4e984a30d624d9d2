"""Dual batch norm (clean/adversarial branches, the dual-bn recipe, checkpoints) and training with
extra unlabeled data (rst, uat, the sampler, resume). Tiny models on the embedded digits."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from robustlab.cli import train as cli_train
from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.models import (
    DualBatchNorm,
    ModelCard,
    bn_branch,
    convert_to_dual_bn,
    create_model,
    load_model,
    save_checkpoint,
    set_bn_branch,
)
from robustlab.models.dual_bn import current_bn_branch
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, UnlabeledData, create_objective, load_unlabeled, train
from robustlab.training.unlabeled import UnlabeledSampler

THREAT = ThreatModel("linf", 0.1)
DIGITS_NORM = {"mean": (0.3053,), "std": (0.3761,)}
ARCH = {"width": 4}  # cifar_cnn (conv-BN-ReLU blocks) at width 4: a tiny BatchNorm net for 8x8 digits


def _bn_model() -> nn.Module:
    return create_model("cifar_cnn", in_channels=1, **DIGITS_NORM, **ARCH)


def _card(**fields) -> ModelCard:
    return ModelCard.for_architecture("cifar_cnn", in_channels=1, arch_kwargs=ARCH, **DIGITS_NORM, **fields)


@pytest.fixture(scope="module")
def batch(digits_train):
    return digits_train.x[:64], digits_train.y[:64]


@pytest.fixture(scope="module")
def dual_trained(batch):
    """A dual-BN model after a few dual-bn steps: its two branches hold different statistics."""
    x, y = batch
    torch.manual_seed(0)
    model = convert_to_dual_bn(_bn_model()).train()
    obj = create_objective("dual-bn", THREAT, steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(3):
        loss, _ = obj(model, x, y, make_generator(0, i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher_path(digits_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint(digits_model, path, ModelCard.for_architecture("digits_cnn"))
    return path


# ---------------------------------------------------------------------- dual batch norm


def test_dual_bn_routes_and_keeps_separate_statistics(batch):
    x, _ = batch
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8),
                        nn.BatchNorm1d(8))
    plain = copy.deepcopy(net).train()
    convert_to_dual_bn(net).train()
    assert isinstance(net[1], DualBatchNorm) and isinstance(net[5], DualBatchNorm)
    assert isinstance(net[5].adv, nn.BatchNorm1d) and current_bn_branch(net) == "clean"
    x_adv = (1 - x) * 0.5 + 0.3  # another input distribution
    with bn_branch(net, "adv"):
        assert current_bn_branch(net) == "adv"
        net(x_adv)
    assert current_bn_branch(net) == "clean"  # restored
    net(x)
    plain(x)
    for layer, ref in ((net[1], plain[1]), (net[5], plain[5])):
        # The clean branch saw only the clean batch (exactly what a plain BN would hold) ...
        assert torch.allclose(layer.clean.running_mean, ref.running_mean)
        assert torch.allclose(layer.clean.running_var, ref.running_var)
        # ... the adversarial one only the other batch.
        assert (layer.adv.running_mean - layer.clean.running_mean).abs().max() > 1e-3
    assert int(net[1].clean.num_batches_tracked) == int(net[1].adv.num_batches_tracked) == 1
    # Eval mode with a chosen branch uses that branch's statistics.
    net.eval()
    for branch in ("clean", "adv"):
        ref = copy.deepcopy(plain).eval()
        ref[1].load_state_dict(getattr(net[1], branch).state_dict())
        ref[5].load_state_dict(getattr(net[5], branch).state_dict())
        set_bn_branch(net, branch)
        assert torch.allclose(net(x), ref(x), atol=1e-6)
    with pytest.raises(RobustlabError, match="no BatchNorm"):
        convert_to_dual_bn(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(RobustlabError, match="no dual batch norm"):
        set_bn_branch(plain, "adv")
    with pytest.raises(RobustlabError, match="branch must be one of"):
        set_bn_branch(net, "both")


def test_conversion_preserves_outputs(batch):
    x, _ = batch
    torch.manual_seed(1)
    model = _bn_model()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        ref = copy.deepcopy(model)
        dual = convert_to_dual_bn(copy.deepcopy(model))
        with torch.no_grad():
            expected = ref(x)
            for branch in ("clean", "adv"):
                with bn_branch(dual, branch):
                    assert torch.equal(dual(x), expected), (mode, branch)
    n_dual = sum(isinstance(m, DualBatchNorm) for m in dual.modules())
    assert n_dual == 6 and convert_to_dual_bn(dual) is dual  # idempotent: dual layers are left alone
    assert sum(isinstance(m, DualBatchNorm) for m in dual.modules()) == n_dual


def test_dual_bn_checkpoint_round_trip_and_branch_choice(dual_trained, batch, tmp_path, capsys):
    x, y = batch
    path = save_checkpoint(dual_trained, tmp_path / "dual.safetensors", _card(dual_bn={"test_branch": "clean"}))
    keys = load_file(str(path))
    assert any(".clean.running_mean" in k for k in keys) and any(".adv.running_mean" in k for k in keys)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["dual_bn"] == {"test_branch": "clean"}
    outs = {}
    with torch.no_grad():
        for branch in ("clean", "adv"):
            with bn_branch(dual_trained, branch):
                outs[branch] = dual_trained(x)
        assert not torch.allclose(outs["clean"], outs["adv"], atol=1e-4)
        loaded = load_model(str(path)).model  # the card's test branch by default
        assert current_bn_branch(loaded) == "clean" and torch.allclose(loaded(x), outs["clean"], atol=1e-6)
        adv = load_model(str(path), bn_branch="adv").model
        assert current_bn_branch(adv) == "adv" and torch.allclose(adv(x), outs["adv"], atol=1e-6)
    # A card whose test branch is adv loads with adv.
    path_adv = save_checkpoint(dual_trained, tmp_path / "dual_adv.safetensors", _card(dual_bn={"test_branch": "adv"}))
    assert current_bn_branch(load_model(str(path_adv)).model) == "adv"
    # The card and the model must agree; plain checkpoints have no branch to choose.
    with pytest.raises(RobustlabError, match="no dual_bn field"):
        save_checkpoint(dual_trained, tmp_path / "bad.safetensors", _card())
    plain = save_checkpoint(_bn_model(), tmp_path / "plain.safetensors", _card())
    with pytest.raises(RobustlabError, match="no dual batch norm"):
        load_model(str(plain), bn_branch="adv")
    with pytest.raises(RobustlabError, match="dual_bn must be"):
        _card(dual_bn={"test_branch": "mixed"})

    # robustlab eval --bn: the clean accuracy it reports is the chosen branch's.
    n = 32
    for branch in ("clean", "adv"):
        assert main(["eval", "--model", str(path), "--data", "digits", "--n", str(n), "--norm", "linf", "--eps", "0.1",
                     "--attack", "fgsm", "--no-sanity", "--db", str(tmp_path / "r.db"), "--json", "--bn", branch]) == 0
        out = json.loads(capsys.readouterr().out)
        from robustlab.data import load_dataset

        test = load_dataset("digits", "test").subset(n)
        with torch.no_grad():
            expected = float((load_model(str(path), bn_branch=branch).model(test.x).argmax(1) == test.y).float().mean())
        assert out["clean_accuracy"] == pytest.approx(expected)
    assert main(["eval", "--model", str(plain), "--data", "digits", "--n", "8", "--norm", "linf", "--eps", "0.1",
                 "--db", str(tmp_path / "r.db"), "--bn", "adv"]) == 2
    assert "no dual batch norm" in capsys.readouterr().err


def test_cli_trains_dual_bn_and_records_the_test_branch(shared_data, tmp_path):
    out = tmp_path / "c.safetensors"
    assert main(["train", "--model", "cifar_cnn", "--data", "cifar10", "--data-root", str(shared_data), "--n", "64",
                 "--epochs", "1", "--batch-size", "32", "--recipe", "dual-bn:steps=1", "--eps", "8/255",
                 "--val-n", "16", "--val-steps", "1", "--bn", "adv", "--out", str(out), "--device", "cpu"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["dual_bn"] == {"test_branch": "adv"} and card["training"]["recipe"] == "dual-bn"
    assert card["training"]["history"][0]["train_ce_adv"] > 0
    assert current_bn_branch(load_model(str(out)).model) == "adv"
    assert current_bn_branch(load_model(str(out), bn_branch="clean").model) == "clean"


def test_dual_bn_training_resumes_to_the_uninterrupted_weights(digits_train, tmp_path):
    data = digits_train.subset(160)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, val_n=32, val_steps=2, seed=5)

    def run(directory, **kwargs):
        model = convert_to_dual_bn(_bn_model())
        set_bn_branch(model, "adv")  # the branch validation (and test time) uses
        train(model, data, config, create_objective("dual-bn", THREAT, steps=2), progress=False,
              checkpoint_dir=directory, **kwargs)
        return model

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    torch.manual_seed(0)
    straight = run(tmp_path / "a")
    torch.manual_seed(0)
    with pytest.raises(Killed):
        run(tmp_path / "b", on_epoch=kill)
    torch.manual_seed(9)  # another initialization: everything must come from the state
    resumed = run(tmp_path / "b", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert any(".adv." in k for k in a) and all(torch.equal(v, b[k]) for k, v in a.items())
    assert current_bn_branch(resumed) == "adv"
    # Both branches were trained, on different statistics.
    bn = next(m for m in resumed.modules() if isinstance(m, DualBatchNorm))
    assert (bn.clean.running_mean - bn.adv.running_mean).abs().max() > 1e-4


# ---------------------------------------------------------------------- recipes


def _recipe(name: str, teacher_path) -> tuple:
    if name == "dual-bn":
        torch.manual_seed(0)
        return create_objective(name, THREAT, steps=3), convert_to_dual_bn(_bn_model())
    torch.manual_seed(0)
    params = {"steps": 3}
    if name == "rst":
        params["teacher"] = str(teacher_path)
    return create_objective(name, THREAT, **params), create_model("digits_cnn")


@pytest.mark.parametrize("name", ["dual-bn", "rst", "uat"])
def test_recipe_loss_is_finite_has_its_term_and_decreases(name, batch, teacher_path):
    x, y = batch
    obj, model = _recipe(name, teacher_path)
    model.train()
    if name == "uat":  # the second half is unlabeled
        y = y.clone()
        y[32:] = -1
    if name == "rst":  # pseudo-labels for the second half
        y = y.clone()
        y[32:] = obj.label_unlabeled(x[32:])
    loss, logs = obj(model, x, y, make_generator(0, 1))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach())) and model.training
    term = {"dual-bn": "ce_adv", "rst": "kl", "uat": "kl"}[name]
    assert float(logs[term]) > 1e-4  # the adversarial / consistency term is there
    first_ce = float(logs["ce"])
    assert float(loss.detach()) > first_ce + 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = float(loss.detach())
    for _ in range(10):
        loss, _ = obj(model, x, y, make_generator(0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = float(obj(model, x, y, make_generator(0, 1))[0].detach())
    assert final < first - 1e-3, (first, final)


def test_uat_perturbs_only_unlabeled_points_and_holds_the_target_fixed(batch, digits_model):
    x, y = batch
    y = y.clone()
    y[40:] = -1
    model = copy.deepcopy(digits_model).train()
    for p in model.parameters():  # (another test may have frozen the shared model as a teacher)
        p.requires_grad_(True)
    obj = create_objective("uat", THREAT, steps=3, **{"lambda": 2.0})
    x_adv = obj.perturb(model, x, y, make_generator(0, 2))
    assert torch.equal(x_adv[:40], x[:40])
    assert bool(THREAT.contains(x_adv, x, tol=0).all()) and float((x_adv[40:] - x[40:]).abs().amax()) > 0.05
    loss, logs = obj(model, x, y, make_generator(0, 2))
    assert float(loss.detach()) == pytest.approx(float(logs["ce"]) + 2.0 * float(logs["kl"]), rel=1e-5)
    assert float(logs["ce"]) == pytest.approx(float(F.cross_entropy(model(x[:40]), y[:40]).detach()), rel=1e-5)
    # The clean prediction is a fixed target: with lambda alone, the gradient is the KL's through
    # the adversarial logits only, so it equals the gradient of KL(stop_grad(p(x)) || p(x_adv)).
    obj0 = create_objective("uat", THREAT, steps=3, **{"lambda": 1.0})
    y_all = torch.full_like(y, -1)
    model.zero_grad()
    obj0(model, x, y_all, make_generator(0, 3))[0].backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x_adv = obj0.perturb(model, x, y_all, make_generator(0, 3))
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)
    F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="batchmean").backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g, model.parameters()))


def test_rst_pseudo_labels_are_the_teachers_argmax(digits_test, digits_model, teacher_path):
    obj = create_objective("rst", THREAT, teacher=str(teacher_path))
    labels = obj.label_unlabeled(digits_test.x, batch_size=100)  # in batches
    with torch.no_grad():
        expected = digits_model(digits_test.x).argmax(dim=1)
    assert labels.dtype == torch.long and torch.equal(labels, expected)
    assert obj.params["teacher"] == str(teacher_path) and obj.params["beta"] == 6.0
    assert create_objective("uat", THREAT).params["lambda"] == 1.0
    with pytest.raises(RobustlabError, match="needs a teacher"):
        create_objective("rst", THREAT)
    with pytest.raises(RobustlabError, match="lambda must be >= 0"):
        create_objective("uat", THREAT, **{"lambda": -1})


# ---------------------------------------------------------------------- unlabeled data


def test_sampler_is_seeded_covers_each_pass_and_resumes():
    a = UnlabeledSampler(10, seed=3)
    draws = [a.draw(4) for _ in range(5)]  # 20 = two passes
    flat = torch.cat(draws)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a new permutation per pass
    b = UnlabeledSampler(10, seed=3)
    b.draw(4)
    c = UnlabeledSampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(torch.cat([c.draw(4) for _ in range(4)]), flat[4:])
    assert not torch.equal(UnlabeledSampler(10, seed=4).draw(10), flat[:10])


def test_load_unlabeled_from_a_data_set_and_a_folder(digits_train, tmp_path):
    from PIL import Image

    u = load_unlabeled("digits:test", digits_train, 0.25)
    assert u.x.shape == (445, 1, 8, 8) and u.per_batch(64) == 16 and u.describe()["n"] == 445
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):  # 16x16 grayscale, any layout: resized to the training size
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "imgs" / "sub" / f"{i}.png")
    u = load_unlabeled(str(tmp_path / "imgs"), digits_train)
    assert u.x.shape == (3, 1, 8, 8) and u.fraction == 0.5
    (tmp_path / "rgb").mkdir()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb" / "a.png")
    with pytest.raises(RobustlabError, match="shape"):
        load_unlabeled(str(tmp_path / "rgb"), digits_train)
    with pytest.raises(RobustlabError, match="fraction"):
        UnlabeledData(digits_train.x[:4], fraction=1.0)
    with pytest.raises(RobustlabError, match="at least one"):
        UnlabeledData(digits_train.x[:4], fraction=0.01).per_batch(16)


def _train_args(out, teacher_path, *extra):
    return ["train", "--model", "digits_cnn", "--data", "digits", "--n", "192", "--epochs", "2", "--batch-size", "64",
            "--recipe", f"rst:steps=2,teacher={teacher_path}", "--eps", "0.1", "--val-n", "32", "--val-steps", "2",
            "--unlabeled", "digits:test", "--unlabeled-fraction", "0.5", "--out", str(out), "--device", "cpu", *extra]


def test_resume_with_unlabeled_data_equals_uninterrupted(tmp_path, teacher_path, monkeypatch, capsys):
    straight = tmp_path / "a.safetensors"
    assert main(_train_args(straight, teacher_path)) == 0
    card = json.loads(straight.with_suffix(".json").read_text())
    t = card["training"]
    assert t["recipe"] == "rst" and t["unlabeled"] == {"spec": "digits:test", "name": "digits:test", "n": 445,
                                                       "fraction": 0.5}
    assert card["dual_bn"] is None and len(t["history"]) == 2 and t["history"][0]["train_kl"] > 0
    state = json.loads((tmp_path / "a.train" / "state.json").read_text())
    steps = math.ceil((192 - 32) / 32)  # 32 labeled + 32 unlabeled per batch of 64
    assert state["unlabeled_sampler"] == {"cursor": 2 * steps * 32, "n": 445}
    assert state["data"]["unlabeled"]["n"] == 445

    real_say = cli_train._say

    def kill_after_first_epoch(msg):
        real_say(msg)
        if msg.strip().startswith("epoch 1:"):
            raise KeyboardInterrupt

    resumed = tmp_path / "b.safetensors"
    monkeypatch.setattr(cli_train, "_say", kill_after_first_epoch)
    assert main(_train_args(resumed, teacher_path)) == 130
    monkeypatch.setattr(cli_train, "_say", real_say)
    assert json.loads((tmp_path / "b.train" / "state.json").read_text())["unlabeled_sampler"]["cursor"] == steps * 32
    assert main([*_train_args(resumed, teacher_path), "--resume"]) == 0
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # Resuming with other unlabeled data is refused.
    capsys.readouterr()
    args = _train_args(resumed, teacher_path, "--resume")
    args[args.index("0.5")] = "0.25"
    assert main(args) == 2 and "started differently" in capsys.readouterr().err


def test_cli_refuses_bad_flags(tmp_path, teacher_path, capsys):
    out = str(tmp_path / "m.safetensors")
    base = ["train", "--model", "digits_cnn", "--data", "digits", "--n", "64", "--epochs", "1", "--eps", "0.1",
            "--out", out, "--device", "cpu"]
    cases = [
        (["--recipe", "trades", "--unlabeled", "digits:test"], "does not train on unlabeled data"),
        (["--recipe", "uat"], "give --unlabeled"),
        (["--recipe", "trades", "--unlabeled-fraction", "0.3"], "--unlabeled-fraction needs --unlabeled"),
        (["--recipe", "uat", "--unlabeled", "digits:test", "--unlabeled-fraction", "1.5"], "fraction"),
        (["--recipe", "uat", "--unlabeled", "nosuchset"], "unknown data set"),
        (["--recipe", "pgd-at", "--bn", "adv"], "--bn chooses a branch"),
        (["--recipe", "dual-bn"], "no BatchNorm"),
        (["--recipe", f"rst:teacher={tmp_path / 'missing.safetensors'}", "--unlabeled", "digits:test"], "not found"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
