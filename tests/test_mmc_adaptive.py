"""The MMC prediction rule's attack: cross-entropy on the MMC head saturates (zero gradients at points
the model fits), so the card of an MMC model declares ``margin-loss`` and the evaluation's adaptive
attacks maximize the DLR margin instead; and MMC with adversarial training (recipe ``mmc-at``)."""

from __future__ import annotations

import pytest
import torch
from helpers import gen, predict

from robustlab.attacks import create_attack
from robustlab.data import load_dataset
from robustlab.defenses import apply_defenses
from robustlab.eval.runner import adaptive_attacks
from robustlab.models import create_model, load_checkpoint
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, train

THREAT = ThreatModel("linf", 0.2)


@pytest.fixture(scope="module")
def mmc_model():
    torch.manual_seed(0)
    objective = create_objective("mmc", radius=10.0)
    model = create_model("digits_mlp", **objective.model_options())
    train(model, load_dataset("digits", "train"), TrainConfig(epochs=6, batch_size=64, lr=3e-3, optimizer="adam"),
          objective)
    x, y = load_dataset("digits", "test").batch(range(100))
    keep = predict(model.eval(), x) == y
    return model, x[keep], y[keep]


def test_cross_entropy_has_no_gradient_on_mmc_and_the_declared_margin_attack_breaks_what_it_leaves(mmc_model):
    model, x, y = mmc_model
    x_req = x.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(model(x_req), y, reduction="sum")
    (g,) = torch.autograd.grad(ce, x_req)
    zero = (g.flatten(1).abs().amax(1) == 0).float().mean()
    assert zero > 0.5  # the softmax underflows to one-hot: no gradient at all on most points
    plain = create_attack("pgd", THREAT, steps=20).run(model, x, y, gen(0))
    defended = apply_defenses(model, ["margin-loss"])
    needs = defended.needs()
    assert needs.loss == "dlr" and "dlr loss in place of cross-entropy" in needs.describe()
    (adaptive,) = adaptive_attacks([create_attack("pgd", THREAT, steps=20)], needs)
    assert adaptive.params["loss"] == "dlr" and adaptive.params["steps"] == 20
    found = adaptive.run(defended, x, y, gen(0))
    robust_plain = (predict(model, plain.x_adv) == y).float().mean()
    robust_adaptive = (predict(model, found.x_adv) == y).float().mean()
    assert robust_adaptive < robust_plain - 0.3  # measured: 0.67 (CE) vs 0.09 (DLR) of the correct points
    assert torch.equal(predict(defended, x), predict(model, x))  # predictions unchanged


def test_with_loss_turns_cross_entropy_attacks_into_margin_attacks():
    apgd = create_attack("apgd-ce", THREAT, steps=7, restarts=2)
    dlr = apgd.with_loss("dlr")
    assert dlr.name == "apgd-dlr" and dlr.params == apgd.params and dlr.threat == apgd.threat
    assert create_attack("pgd", THREAT, loss="cw").with_loss("dlr").params["loss"] == "cw"  # not on CE: kept
    square = create_attack("square", THREAT)
    assert square.with_loss("dlr") is square


def test_mmc_at_trains_on_points_of_higher_mmc_loss_inside_the_ball(mmc_model):
    model, x, y = mmc_model
    at = create_objective("mmc-at", THREAT, radius=10.0, steps=5)
    x_adv = at.perturb(model, x, y, gen(0))
    assert bool(THREAT.contains(x_adv, x).all())
    with torch.no_grad():
        clean_loss, adv_loss = -model(x).gather(1, y[:, None]) / 2, -model(x_adv).gather(1, y[:, None]) / 2
    assert float(adv_loss.mean()) > 2 * float(clean_loss.mean())
    loss, logs = at(model, x, y, gen(0))
    assert "adv_acc" in logs and float(loss.detach()) > float(clean_loss.mean())


def test_an_mmc_checkpoint_declares_the_margin_loss_so_eval_is_adaptive(tmp_path):
    from robustlab.cli import main

    out = tmp_path / "m.safetensors"
    assert main(["train", "--model", "digits_mlp", "--data", "digits", "--n", "64", "--epochs", "1",
                 "--recipe", "mmc-at:radius=5,steps=2", "--norm", "linf", "--eps", "0.1", "--out", str(out)]) == 0
    _, card = load_checkpoint(out)
    assert card.arch_kwargs == {"head": "mmc:5"} and [d["name"] for d in card.defense] == ["margin-loss"]
