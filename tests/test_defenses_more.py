"""Issue 14, second part: the ``rand`` ensemble for randomized defenses (chosen for ``standard`` on a
randomized model), the leaderboard's mark on defended models evaluated only non-adaptively, the
truthful "randomized" verdict for k-WTA's sampled gradients, and defensive distillation trained at
temperature T and deployed at T = 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from leaderboard_store import add_run

from robustlab import losses
from robustlab.attacks import build_attacks, create_attack
from robustlab.attacks.ensemble import WorstCaseEnsemble
from robustlab.cli import main
from robustlab.defenses import DefendedModel, create_defense
from robustlab.defenses.base import Defense
from robustlab.eval import sanity
from robustlab.eval.store import ResultsStore
from robustlab.models import create_model
from robustlab.report.html import _model_notes
from robustlab.report.leaderboard import build_leaderboard
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, create_objective, train

CKPT = str(Path(__file__).parent / "golden" / "digits_cnn.safetensors")
LINF = ThreatModel("linf", 0.1)


class GradientNoise(Defense):
    """A randomized defense of our construction: the image goes through unchanged in value, but each
    draw multiplies the gradient per pixel by ``1 + scale * N(0, 1)``. One draw's gradient sign is
    close to a coin flip; the mean over draws recovers the true direction (what EOT computes)."""

    name = "gradient-noise"
    defaults = {"scale": 10.0, "draws": 5}
    randomized = True

    def transform(self, x, generator=None):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        scaled = x * (1 + self.params["scale"] * noise)
        return x + (scaled - scaled.detach())


def test_standard_runs_as_rand_on_a_randomized_model():
    plain = [(a.name, a.params.get("eot")) for a in build_attacks(["standard"], LINF)]
    assert plain == [("apgd-ce", 1), ("apgd-t", 1), ("fab-t", None), ("square", None)]
    rand = build_attacks(["standard"], LINF, randomized=True)
    assert [(a.name, a.params["eot"], a.params["steps"], a.params["restarts"]) for a in rand] == [
        ("apgd-ce", 20, 100, 1), ("apgd-dlr", 20, 100, 1)]  # AutoAttack's version='rand'
    assert [a.config() for a in build_attacks(["rand"], LINF)] == [a.config() for a in rand]


def test_rand_ensemble_finds_what_single_draw_apgd_misses(digits_train, digits_test):
    torch.manual_seed(0)  # a linear model on digits: quick, and APGD breaks it predictably undefended
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    xt, yt = digits_train.batch(range(len(digits_train)))
    opt = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    x, y = digits_test.batch(range(64))
    threat = ThreatModel("linf", 0.1)
    defended = DefendedModel(model, [GradientNoise(scale=10.0)])
    assert defended.randomized
    with torch.no_grad():  # the values are the model's: robustness can only be an illusion
        assert torch.equal(defended.predict(x, torch.Generator().manual_seed(3)), model(x).argmax(1))

    def robust(m, attacks) -> int:
        if m is defended:
            defended.set_generator(torch.Generator().manual_seed(1))
        res = WorstCaseEnsemble(attacks).run(m, x, y, torch.Generator().manual_seed(0))
        with torch.no_grad():
            return int((defended.predict(res.x_adv, torch.Generator().manual_seed(2)) == y).sum())

    undefended = robust(model, [create_attack("apgd-ce", threat)])
    single = robust(defended, [create_attack("apgd-ce", threat)])
    rand = robust(defended, build_attacks(["rand"], threat))
    assert single >= undefended + 15, (undefended, single)  # one draw per step: the defense "works"
    assert rand <= undefended + 2, (undefended, rand)  # EOT over 20 draws: it does not


def test_cli_standard_on_a_randomized_defense_runs_rand(tmp_path, capsys):
    # the noise is so strong that the one image is misclassified: nothing to attack, only the choice to see
    code = main(["eval", "--model", CKPT, "--data", "digits", "--norm", "linf", "--eps", "0.1", "--n", "1",
                 "--attack", "standard", "--defense", "noise:sigma=1,draws=1", "--no-sanity", "--steps-grid",
                 "none", "--device", "cpu", "--db", str(tmp_path / "r.db"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    out = json.loads(captured.out)
    assert [(a["name"], a["params"]["eot"]) for a in out["attacks"]] == [("apgd-ce", 20), ("apgd-dlr", 20)]
    assert "runs as 'rand'" in captured.err


def test_leaderboard_marks_and_never_ranks_a_defended_model_evaluated_only_non_adaptively(tmp_path):
    jpeg = [{"name": "jpeg", "params": {"quality": 75}}]
    with ResultsStore(tmp_path / "runs.db") as store:
        plain = add_run(store, "plain", sha="1" * 64, robust=5)
        adaptive = add_run(store, "jpeg-adaptive", sha="2" * 64, robust=6, defenses=jpeg)
        naive = add_run(store, "jpeg-naive", sha="3" * 64, robust=15, defenses=jpeg, adaptive=False)
        board = build_leaderboard(store)
    (group,) = board.groups
    rows = {r.run_id: r for r in group.rows}
    assert rows[plain].rank is not None and rows[adaptive].rank is not None
    assert rows[naive].rank is None  # the highest robust accuracy, and not ranked
    mark = "unreliable: a defended model evaluated only non-adaptively (no adaptive attack recorded)"
    assert mark in rows[naive].notes and mark not in rows[adaptive].notes
    assert group.rows[-1].run_id == naive  # below every ranked entry


def test_sampled_gradients_verdict_says_predictions_are_deterministic():
    torch.manual_seed(0)
    kwta = create_model("digits_cnn", activation="kwta:0.2").eval()
    defended = DefendedModel(kwta, [create_defense("sampled-gradients", sigma=0.1, draws=4)])
    x = torch.rand(8, 1, 8, 8)
    info = sanity.inspect_model(defended, x)
    assert info["randomized"] is False and info["attack_randomized"] == ["sampled-gradients"]
    (_, verdict) = sanity.mode_verdicts(info)
    assert verdict["status"] == "pass"
    assert verdict["detail"].startswith("predictions are deterministic")
    assert "sampled-gradients" in verdict["detail"]
    notes = _model_notes({"model_info": {"source": "registry", **info}})  # the report says the same
    assert "no: predictions are deterministic" in notes and "sampled-gradients" in notes
    noisy = DefendedModel(kwta, [create_defense("noise", sigma=0.1, draws=3)])  # truly randomized: still warned
    info = sanity.inspect_model(noisy, x)
    assert info["randomized"] is True and "attack_randomized" not in info
    assert sanity.mode_verdicts(info)[1]["status"] == "warn"


def test_distillation_trains_at_temperature_and_deploys_at_one(digits_train):
    data = digits_train.subset(512)
    x, y = data.batch(range(512))
    t = 20.0
    recipe = create_objective("distillation", temperature=t)
    torch.manual_seed(0)
    model = create_model("digits_cnn")
    loss, _ = recipe(model, x, y, None)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.cross_entropy(model(x) / t, y)), rel=1e-5)  # trained at T
    train(model, data, TrainConfig(epochs=6, batch_size=64, lr=0.05 * t, seed=0), objective=recipe, progress=False)
    torch.manual_seed(0)
    standard = create_model("digits_cnn")
    train(standard, data, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0), progress=False)
    with torch.no_grad():
        logits, reference = model.eval()(x), standard.eval()(x)
    assert (logits.argmax(1) == y).float().mean() > 0.7
    # deployed at T = 1: the raw logits, about T times larger than a standard model's; softmax saturates
    margin = lambda z: (z.topk(2, dim=1).values[:, 0] - z.topk(2, dim=1).values[:, 1]).median()  # noqa: E731
    assert margin(logits) > 5 * margin(reference)
    # why the evaluation must use a logit loss: at T = 1 the softmax saturates and the cross-entropy's
    # input gradients shrink by orders of magnitude against a standard model's; the DLR loss's do not
    def gradient_norm(net, fn):
        xg = x[:128].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(net(xg), y[:128]).sum(), xg)
        return float(g.flatten(1).norm(dim=1).median())

    ratio = {name: gradient_norm(model, fn) / gradient_norm(standard, fn)
             for name, fn in (("ce", losses.cross_entropy), ("dlr", losses.dlr))}
    assert ratio["ce"] < 1e-2 and ratio["dlr"] > 0.1, ratio
    # the distilled network: the teacher's soft labels at the same temperature
    student = create_objective("distillation", temperature=t, teacher=model)
    soft = F.softmax(logits / t, dim=1)
    fresh = create_model("digits_cnn")
    with torch.no_grad():
        expected = -(soft * F.log_softmax(fresh(x) / t, dim=1)).sum(1).mean()
        assert float(student(fresh, x, y, None)[0]) == pytest.approx(float(expected), rel=1e-5)
