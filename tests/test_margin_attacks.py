"""The margin attacks: Minimum-Margin (``mm``, Gao et al. 2022) and Margin-Decomposition (``md``,
``md-mt``, Ma et al.), on a small CNN trained here on sklearn digits.

What is checked: adversarial examples stay in the threat model and the box, and the success flags are
what a fresh forward pass predicts; per-sample gradient and forward counts are exact (a model wrapper
counts every call per sample, independently of the attack's bookkeeping), broken samples stop at the
first misclassified query and return that very point; results are reproducible from the generator and
the model is left untouched; at the same total gradient budget each attack is at least as strong as
PGD on cross-entropy, and MM with k targets at least as strong as MM with one (the first target run is
the same run); the MD step-size schedule and loss terms; the registry, ``robustlab eval --attack``, and
bad parameters raising RobustlabError.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS, create_attack
from robustlab.attacks.md import cosine_step, margin, other_term, true_term
from robustlab.attacks.mm import target_margin
from robustlab.errors import RobustlabError
from robustlab.params import parse_spec
from robustlab.threat import ThreatModel
from helpers import Recorder, gen, predict, robust_fraction, separated

NAMES = ("mm", "md", "md-mt")
EPS = {"linf": 0.1, "l2": 0.7, "l1": 1.5}


def _fast(name: str) -> dict:
    """Small budgets for the checks that do not depend on them."""
    return {"mm": {"steps": 10, "targets": 2}, "md": {"steps": 10}, "md-mt": {"steps": 6, "n_target_classes": 2}}[name]


# ---------------------------------------------------------------------- validity of the results


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", NAMES)
def test_results_inside_threat_model_and_flags_are_true(digits, name, norm):
    model, x, y = digits
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])
    result = create_attack(name, threat, **_fast(name)).run(model, x, y, gen())
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype and not result.x_adv.requires_grad
    # Inside with no tolerance at all (box included), and exactly the points the attack evaluated.
    assert bool(threat.contains(result.x_adv, x, tol=0.0).all())
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert torch.equal(threat.project(result.x_adv, x), result.x_adv)
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    for counts in (result.gradients, result.forwards):
        assert counts.dtype == torch.long and counts.shape == (len(y),)
    assert bool((result.forwards >= result.gradients).all()) and bool((result.forwards >= 1).all())
    assert result.success.float().mean() > 0.2  # the attack found something
    assert torch.equal(x, x_before)


def test_mm_runs_in_l1(digits):
    """MM is APGD underneath, so it has APGD's sparse L1 steps too."""
    model, x, y = digits
    threat = ThreatModel("l1", EPS["l1"])
    result = create_attack("mm", threat, steps=10, targets=2).run(model, x, y, gen())
    assert bool(threat.contains(result.x_adv, x, tol=0.0).all())
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    assert result.success.float().mean() > 0.2


@pytest.mark.parametrize("name", NAMES)
def test_eps_zero_gives_the_clean_points(digits, name):
    model, x, y = digits
    result = create_attack(name, ThreatModel("linf", 0.0), **_fast(name)).run(model, x, y, gen())
    assert torch.equal(result.x_adv, x)
    assert torch.equal(result.success, predict(model, x) != y)
    assert bool((result.gradients == 0).all()) and bool((result.forwards == 1).all())


# ---------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", NAMES)
def test_counts_are_exact(digits_model, digits_test, name, norm):
    """Per sample, the gradients and forwards the attack reports are what the model saw; an unbroken
    sample costs steps gradients and steps + 1 forwards per run (MM, MD-MT: plus one clean forward);
    a broken one stops at the first misclassifying query and returns that point."""
    threat = ThreatModel(norm, EPS[norm])
    keep = separated(digits_test.x, threat, 100)
    x, y = digits_test.x[keep], digits_test.y[keep]
    steps, restarts, targets = 6, 2, 2
    params = {"steps": steps, "restarts": restarts}
    if name == "mm":
        params["targets"] = targets
    if name == "md-mt":
        params["n_target_classes"] = targets
    rec = Recorder(digits_model, x, y, threat)
    result = create_attack(name, threat, **params).run(rec, x, y, gen())
    assert torch.equal(result.forwards, rec.forwards)
    assert torch.equal(result.gradients, rec.gradients)
    runs = restarts * (targets if name in ("mm", "md-mt") else 1)
    clean = 0 if name == "md" else 1
    robust = ~result.success
    assert int(robust.sum()) > 0 and int(result.success.sum()) > 0
    assert bool((result.gradients[robust] == runs * steps).all())
    assert bool((result.forwards[robust] == runs * (steps + 1) + clean).all())
    assert bool((rec.first_wrong[robust] == -1).all())
    broken = result.success.nonzero(as_tuple=True)[0]
    assert torch.equal(result.forwards[broken], rec.first_wrong[broken])
    assert int((result.forwards[broken] > steps + 1 + clean).sum()) > 0  # some broken by a later run
    for i in broken.tolist():
        assert torch.equal(result.x_adv[i], rec.queried[(i, int(rec.first_wrong[i]))])
    if clean:  # already misclassified clean points cost one forward and stay as they are
        wrong = predict(digits_model, x) != y
        assert int(wrong.sum()) > 0
        assert bool((result.forwards[wrong] == 1).all()) and bool((result.gradients[wrong] == 0).all())
        assert torch.equal(result.x_adv[wrong], x[wrong])


# ---------------------------------------------------------------------- strength


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_at_least_as_strong_as_pgd_at_equal_budget(digits_model, digits_test, norm):
    """60 input gradients per sample for everyone: PGD-CE 60 steps; MM3 with 20 steps per target; MD
    with 2 restarts of 30; MD-MT with 3 targets x 2 restarts x 10 (the first 300 test images)."""
    x, y = digits_test.x[:300], digits_test.y[:300]
    threat = ThreatModel(norm, {"linf": 0.1, "l2": 0.5}[norm])
    budget = 60
    pgd = create_attack("pgd", threat, steps=budget).run(digits_model, x, y, gen())
    slack = 2 / len(y)
    for name, params in (
        ("mm", {"steps": 20, "targets": 3}),
        ("md", {"steps": 30, "restarts": 2}),
        ("md-mt", {"steps": 10, "restarts": 2, "n_target_classes": 3}),
    ):
        result = create_attack(name, threat, **params).run(digits_model, x, y, gen())
        assert int(result.gradients.max()) == budget, name
        assert robust_fraction(result) <= robust_fraction(pgd) + slack, (name, robust_fraction(result), robust_fraction(pgd))


def test_mm_k_targets_at_least_as_strong_as_one(digits_model, digits_test):
    """The first target run of MM-k is MM-1's run (same start, same target): MM-k keeps every success of
    MM-1, at the same points, and adds some."""
    x, y = digits_test.x[:300], digits_test.y[:300]
    for norm in ("linf", "l2"):
        threat = ThreatModel(norm, {"linf": 0.1, "l2": 0.5}[norm])
        one = create_attack("mm", threat, steps=20, targets=1).run(digits_model, x, y, gen(2))
        three = create_attack("mm", threat, steps=20, targets=3).run(digits_model, x, y, gen(2))
        assert bool((three.success | ~one.success).all()), norm
        assert torch.equal(three.x_adv[one.success], one.x_adv[one.success])
        assert int(three.success.sum()) > int(one.success.sum()), norm


def test_restarts_only_add_successes(digits):
    model, x, y = digits
    threat = ThreatModel("linf", 0.07)
    one = create_attack("md", threat, steps=8, restarts=1).run(model, x, y, gen(3))
    four = create_attack("md", threat, steps=8, restarts=4).run(model, x, y, gen(3))
    assert bool((four.success | ~one.success).all())
    assert torch.equal(four.x_adv[one.success], one.x_adv[one.success])


# ---------------------------------------------------------------------- the pieces


def test_md_step_schedule_and_terms():
    # Cosine annealing from 2 eps within each stage, restarted at the switch, never reaching 0.
    steps, switch, initial = 50, 25, 0.2
    sizes = [cosine_step(i, steps, switch, initial) for i in range(steps)]
    assert sizes[0] == initial and sizes[switch] == initial
    assert sizes[switch // 2 + 0] == pytest.approx(initial * 0.5 * (1 + math.cos(math.pi * 12 / 25)))
    for stage in (sizes[:switch], sizes[switch:]):
        assert all(a > b > 0 for a, b in zip(stage, stage[1:]))
    assert [cosine_step(i, 10, 0, 1.0) for i in (0, 5)] == [1.0, pytest.approx(0.5)]
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.5, 0.0, 2.0, 4.0]])
    y, t = torch.tensor([1, 3]), torch.tensor([3, 0])
    assert torch.equal(true_term(logits, y), torch.tensor([-5.0, -4.0]))
    assert torch.equal(other_term(logits, y), torch.tensor([3.0, 2.0]))
    assert torch.equal(other_term(logits, y, t), torch.tensor([-2.0, 0.5]))
    assert torch.equal(margin(logits, y), torch.tensor([-2.0, -2.0]))
    assert torch.equal(margin(logits, y, t), torch.tensor([-7.0, -3.5]))
    assert torch.equal(target_margin(logits, torch.stack([t, y], dim=1)), torch.tensor([-7.0, -3.5]))


# ---------------------------------------------------------------------- the model, reproducibility


@pytest.mark.parametrize("name", NAMES)
def test_model_untouched(digits, name):
    model, x, y = digits
    model = copy.deepcopy(model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    create_attack(name, ThreatModel("linf", 0.1), **_fast(name)).run(model, x, y, gen())
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", NAMES)
def test_reproducible_from_the_generator(digits, name, norm):
    model, x, y = digits
    x, y = x[:60], y[:60]
    attack = create_attack(name, ThreatModel(norm, EPS[norm]), **_fast(name))
    a, b, c = (attack.run(model, x, y, gen(s)) for s in (5, 5, 6))
    for field in ("x_adv", "success", "gradients", "forwards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.x_adv, c.x_adv)
    cfg = json.loads(json.dumps(attack.config()))  # JSON all the way
    rebuilt = create_attack(cfg["name"], ThreatModel(**cfg["threat"]), cfg["targeted"], **cfg["params"])
    assert torch.equal(rebuilt.run(model, x, y, gen(5)).x_adv, a.x_adv)


# ---------------------------------------------------------------------- registry, CLI, bad input


def test_registry_defaults_and_specs():
    assert set(NAMES) <= set(ATTACKS.names())
    threat = ThreatModel("linf", 8 / 255)
    mm = create_attack("mm", threat)
    assert mm.params == {"steps": 20, "restarts": 1, "eot": 1, "rho": 0.75, "targets": 3} and mm.kind == "white-box"
    assert create_attack("md", threat).params == {"steps": 50, "restarts": 2, "switch": 0.5}
    assert create_attack("md-mt", threat).params["n_target_classes"] == 9
    assert parse_spec("md:steps=50") == ("md", {"steps": 50})
    name, params = parse_spec("mm:targets=9,steps=100")  # MM+
    assert create_attack(name, threat, **params).params["targets"] == 9
    assert create_attack("md-mt", threat, switch=0.4).switch_step() == 20
    assert create_attack("md", threat, switch=0.29, steps=100).switch_step() == 29


def test_eval_command_runs_them(digits_model, tmp_path, capsys):
    from robustlab.cli import main
    from robustlab.models import ModelCard, save_checkpoint

    ckpt = save_checkpoint(digits_model, tmp_path / "digits.safetensors",
                           ModelCard.for_architecture("digits_cnn", num_classes=10, dataset="digits"))
    code = main(["eval", "--data", "digits", "--norm", "linf", "--eps", "0.1", "--model", str(ckpt), "--n", "60",
                 "--attack", "mm:steps=5,targets=2", "--attack", "md:steps=6", "--attack",
                 "md-mt:steps=4,n_target_classes=2", "--db", str(tmp_path / "r.db"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in out["attacks"]] == ["mm", "md", "md-mt"]
    assert out["attacks"][0]["params"]["targets"] == 2 and out["attacks"][1]["params"]["steps"] == 6
    assert out["robust_accuracy"] < out["clean_accuracy"]


@pytest.mark.parametrize(
    "name,params",
    [
        ("mm", {"steps": 0}),
        ("mm", {"targets": 0}),
        ("mm", {"restarts": 0}),
        ("mm", {"rho": 1.5}),
        ("mm", {"steps": 2.5}),
        ("mm", {"n_target_classes": 3}),
        ("md", {"steps": 0}),
        ("md", {"restarts": 0}),
        ("md", {"switch": 1.0}),
        ("md", {"switch": -0.1}),
        ("md", {"switch": "half"}),
        ("md", {"targets": 3}),
        ("md-mt", {"n_target_classes": 0}),
        ("md-mt", {"steps": "many"}),
    ],
)
def test_bad_params_raise(name, params):
    with pytest.raises(RobustlabError):
        create_attack(name, ThreatModel("linf", 0.1), **params)


def test_bad_setups_raise(digits):
    model, x, y = digits
    for name in NAMES:
        with pytest.raises(RobustlabError):
            create_attack(name, ThreatModel("linf", 0.1), targeted=True)
    for name in ("md", "md-mt"):
        with pytest.raises(RobustlabError):
            create_attack(name, ThreatModel("l1", 1.0))
    with pytest.raises(RobustlabError):
        create_attack("mm", ThreatModel("linf", 0.1), steps=2).run(model, x * 2, y)
    with pytest.raises(RobustlabError):
        create_attack("md", ThreatModel("linf", 0.1), steps=2).run(nn.Flatten(0), x, y)  # not (N, K)
