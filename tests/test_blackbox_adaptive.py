"""Black-box, transfer, feature-space and adaptive tools on the small digits model of conftest.

What is checked: query counts are exact per sample (a counting model sees every image the attack
sends) and black-box attacks never take a gradient; results stay in the threat model (minimum-norm
HopSkipJump: in the box, flags true); SPSA and NES lower the accuracy clearly; HopSkipJump's
perturbations shrink with more queries; transfer from a second, independently trained digits model
breaks a clear fraction without one gradient of the target; SSP changes predictions without labels and
``perturb_folder`` writes one PNG per image inside the threat model; BPDA restores PGD against a
quantizing (gradient-masking) defense; EOT beats single draws against a random-noise defense.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS, create_attack
from robustlab.defenses.bpda import Pipeline, bpda
from robustlab.attacks.pgd import PGD
from robustlab.attacks.ssp import perturb_folder
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel
from helpers import gen, predict


@pytest.fixture(scope="module")
def batch(digits_model, digits_test):
    """The first 100 test images and labels, and which of them the model gets right."""
    x, y = digits_test.x[:100], digits_test.y[:100]
    with torch.no_grad():
        correct = digits_model(x).argmax(1) == y
    assert correct.float().mean() > 0.9
    return x, y, correct


class CountingModel(nn.Module):
    """Counts the images it is queried with and records whether any call could be differentiated."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0
        self.calls = 0
        self.differentiable_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        self.calls += 1
        if torch.is_grad_enabled() and x.requires_grad:
            self.differentiable_calls += 1
        return self.model(x)


# ---------------------------------------------------------------------- score-based: SPSA and NES

SCORE_BASED = {"spsa": {"lr": 0.02}, "nes": {}}


@pytest.mark.parametrize("name", sorted(SCORE_BASED))
def test_score_based_lowers_accuracy_inside_the_ball_with_exact_counts(digits_model, batch, name):
    x, y, correct = batch
    steps, samples = 12, 16
    per_step = 2 * samples + 1
    threat = ThreatModel("linf", 0.2)
    attack = create_attack(name, threat, steps=steps, samples=samples, **SCORE_BASED[name])
    assert attack.kind == "score-based"
    counting = CountingModel(digits_model)
    result = attack.run(counting, x, y, gen())
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(result.success, predict(digits_model, result.x_adv) != y)
    robust = 1 - result.success.float().mean().item()
    assert robust < correct.float().mean().item() - 0.4, robust
    # Counts: no gradient, and every image sent to the model is one query of exactly one sample.
    assert counting.differentiable_calls == 0 and bool((result.gradients == 0).all())
    assert int(result.forwards.sum()) == counting.images
    # A sample found broken at step t (its current point, seen with the step's probes) cost
    # t * per_step queries; one never broken, or broken only at its last point, cost steps * per_step + 1.
    q = result.forwards
    early = (q % per_step == 0) & (q >= per_step) & (q <= steps * per_step)
    assert bool((early | (q == steps * per_step + 1)).all())
    assert bool(result.success[q < steps * per_step].all())
    # Misclassified clean points are seen at the first step and dropped at once.
    assert bool((q[~correct] == per_step).all()) and int((~correct).sum()) > 0


@pytest.mark.parametrize("name", sorted(SCORE_BASED))
def test_score_based_per_sample_counts_match_a_model_queried_alone(digits_model, batch, name):
    """Per-sample exactness: attacked one at a time, each sample's count is what the model saw."""
    x, y, _ = batch
    attack = create_attack(name, ThreatModel("l2", 1.0), steps=4, samples=8, **SCORE_BASED[name])
    for i in range(4):
        counting = CountingModel(digits_model)
        result = attack.run(counting, x[i : i + 1], y[i : i + 1], gen(i))
        assert int(result.forwards[0]) == counting.images
        assert bool(ThreatModel("l2", 1.0).contains(result.x_adv, x[i : i + 1]).all())


def test_score_based_reproducible_and_validated(digits_model, batch):
    x, y, _ = batch
    attack = create_attack("spsa", ThreatModel("linf", 0.1), steps=3, samples=8)
    a, b = attack.run(digits_model, x[:20], y[:20], gen(5)), attack.run(digits_model, x[:20], y[:20], gen(5))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.forwards, b.forwards)
    for name, params in [("spsa", {"samples": 0}), ("spsa", {"lr": 0.0}), ("spsa", {"beta1": 1.0}),
                         ("nes", {"sigma": -1.0}), ("nes", {"momentum": 1.0}), ("nes", {"alpha": 0.0})]:
        with pytest.raises(RobustlabError):
            create_attack(name, ThreatModel("linf", 0.1), **params)
    with pytest.raises(RobustlabError):
        create_attack("spsa", ThreatModel("l1", 1.0))


# ---------------------------------------------------------------------- decision-based: HopSkipJump


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hopskipjump_shrinks_with_queries_and_counts_exactly(digits_model, batch, norm):
    x, y, correct = batch
    x, y = x[correct][:24], y[correct][:24]
    eps = {"l2": 1.0, "linf": 0.15}[norm]
    medians = []
    for budget in (150, 1200):
        attack = create_attack("hopskipjump", ThreatModel(norm, eps), queries=budget)
        assert attack.kind == "decision-based" and attack.minimum_norm
        counting = CountingModel(digits_model)
        result = attack.run(counting, x, y, gen())
        # Label queries only, never above the budget, exactly what the model saw.
        assert counting.differentiable_calls == 0 and bool((result.gradients == 0).all())
        assert int(result.forwards.sum()) == counting.images
        assert bool((result.forwards <= budget).all()) and bool((result.forwards > budget // 2).all())
        # Minimum-norm: in the box, and every claimed point is really misclassified.
        assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
        assert bool(result.success.all())
        assert torch.equal(result.success, predict(digits_model, result.x_adv) != y)
        medians.append(float(attack.threat.distance(result.x_adv, x).median()))
    assert medians[1] < 0.85 * medians[0], medians


def test_hopskipjump_per_sample_counts_and_edge_cases(digits_model, batch):
    x, y, correct = batch
    attack = create_attack("hopskipjump", ThreatModel("l2", 1.0), queries=120)
    for i in range(3):
        counting = CountingModel(digits_model)
        result = attack.run(counting, x[i : i + 1], y[i : i + 1], gen(i))
        assert int(result.forwards[0]) == counting.images <= 120
    # A misclassified clean point costs one query and is returned as is.
    wrong = (~correct).nonzero(as_tuple=True)[0][:1]
    result = attack.run(digits_model, x[wrong], y[wrong], gen())
    assert torch.equal(result.x_adv, x[wrong]) and bool(result.success.all()) and int(result.forwards[0]) == 1
    # No misclassified starting point within the trials (a constant model): unbroken, nothing moved.
    constant = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.arange(10.0))
    labels = torch.full((4,), 9, dtype=torch.long)
    result = create_attack("hopskipjump", ThreatModel("linf", 0.1), queries=50, init_trials=5).run(
        constant, x[:4], labels, gen())
    assert not bool(result.success.any()) and torch.equal(result.x_adv, x[:4])
    assert bool((result.forwards == 6).all())
    with pytest.raises(RobustlabError):
        create_attack("hopskipjump", ThreatModel("l1", 1.0))
    with pytest.raises(RobustlabError):
        create_attack("hopskipjump", ThreatModel("l2", 1.0), queries=0)


# ---------------------------------------------------------------------- transfer


@pytest.fixture(scope="module")
def surrogate_checkpoint(digits_train, tmp_path_factory):
    """A second digits CNN, trained with another seed (and fewer epochs), saved as a checkpoint."""
    from robustlab.models import ModelCard, create_model, save_checkpoint
    from robustlab.training import TrainConfig, train

    torch.manual_seed(1)
    model = create_model("digits_cnn", num_classes=10)
    train(model, digits_train, TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=1), progress=False)
    path = tmp_path_factory.mktemp("surrogate") / "digits_seed1.safetensors"
    save_checkpoint(model.eval(), path, ModelCard.for_architecture("digits_cnn", num_classes=10))
    return str(path)


def test_transfer_breaks_the_target_without_its_gradients(digits_model, batch, surrogate_checkpoint):
    x, y, correct = batch
    threat = ThreatModel("linf", 0.2)
    attack = create_attack("transfer", threat, surrogate=surrogate_checkpoint, steps=10)
    assert attack.kind == "transfer" and attack.params["base"] == "mifgsm"
    target = CountingModel(digits_model)
    result = attack.run(target, x, y, gen())
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(result.success, predict(digits_model, result.x_adv) != y)
    assert result.success[correct].float().mean() > 0.4
    # The target: one forward per sample, never differentiated; the gradients are the surrogate's.
    assert target.differentiable_calls == 0 and target.images == len(y) and target.calls == 1
    assert bool((result.forwards == 1).all()) and bool((result.gradients == 10).all())
    # The surrogate is loaded once per attack object; DI and a PGD base work too.
    assert attack.surrogate() is attack.surrogate()
    pgd_based = create_attack("transfer", threat, surrogate=surrogate_checkpoint, base="pgd", steps=5,
                              diverse_input=1.0, resize_rate=0.75)
    result = pgd_based.run(digits_model, x, y, gen())
    assert bool(threat.contains(result.x_adv, x).all()) and result.success[correct].float().mean() > 0.1


def test_diverse_input_resizes_and_pads_to_the_same_size():
    from robustlab.attacks.transfer import DiverseInput

    x = torch.rand(2, 3, 10, 10)
    always = DiverseInput(nn.Identity(), p=1.0, resize_rate=0.6, generator=gen())
    sides = set()
    for _ in range(30):
        out = always(x)
        assert out.shape == x.shape
        rows, cols = (out.abs().sum(dim=(0, 1, 3)) > 0).sum(), (out.abs().sum(dim=(0, 1, 2)) > 0).sum()
        assert 6 <= int(rows) <= 10 and int(rows) == int(cols)  # one scale, zero padding around it
        sides.add(int(rows))
    assert len(sides) > 2
    assert torch.equal(DiverseInput(nn.Identity(), p=0.0)(x), x)
    # Reproducible from the generator.
    a, b = DiverseInput(nn.Identity(), 0.5, 0.6, gen(7)), DiverseInput(nn.Identity(), 0.5, 0.6, gen(7))
    assert all(torch.equal(a(x), b(x)) for _ in range(5))


def test_transfer_validation():
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(RobustlabError):
        create_attack("transfer", threat)  # no surrogate
    for params in ({"base": "spsa"}, {"base": "nosuch"}, {"diverse_input": 1.5}, {"base": "fgsm", "restarts": 3}):
        with pytest.raises(RobustlabError):
            create_attack("transfer", threat, surrogate="x.safetensors", **params)


# ---------------------------------------------------------------------- SSP and perturb_folder


def test_ssp_changes_predictions_without_labels(digits_model, batch):
    x, y, _ = batch
    threat = ThreatModel("linf", 0.2)
    attack = create_attack("ssp", threat, layer="net.relu3", steps=10)
    garbage = torch.randint(0, 10, y.shape, generator=gen(3))
    a = attack.run(digits_model, x, y, gen())
    b = attack.run(digits_model, x, garbage, gen())
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)  # labels are ignored
    assert bool(threat.contains(a.x_adv, x).all())
    assert torch.equal(a.success, predict(digits_model, a.x_adv) != predict(digits_model, x))
    assert a.success.float().mean() > 0.4
    assert bool((a.gradients == 10).all()) and bool((a.forwards == 13).all())
    l2 = create_attack("ssp", ThreatModel("l2", 1.5), steps=10).run(digits_model, x, y, gen())
    assert bool(ThreatModel("l2", 1.5).contains(l2.x_adv, x).all()) and l2.success.float().mean() > 0.3
    with pytest.raises(RobustlabError):
        create_attack("ssp", threat, layer="no.such.layer").run(digits_model, x[:2], y[:2])
    with pytest.raises(RobustlabError):
        create_attack("ssp", threat, targeted=True)


def test_ssp_with_a_separate_feature_network(digits_model, batch, surrogate_checkpoint):
    x, y, _ = batch
    threat = ThreatModel("linf", 0.2)
    attack = create_attack("ssp", threat, feature_model=surrogate_checkpoint, layer="net.relu3", steps=10)
    assert attack.kind == "transfer"
    target = CountingModel(digits_model)
    result = attack.run(target, x, y, gen())
    assert bool(threat.contains(result.x_adv, x).all())
    # The target is only asked for its predictions on x and x_adv (one call); gradients are the
    # feature network's.
    assert target.calls == 1 and target.images == 2 * len(y) and target.differentiable_calls == 0
    assert bool((result.forwards == 2).all()) and bool((result.gradients == 10).all())
    assert result.success.float().mean() > 0.15


def test_perturb_folder_writes_one_png_per_image_inside_eps(digits_model, digits_test, tmp_path):
    from PIL import Image

    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    pixels = (digits_test.x[:10, 0] * 255).round().to(torch.uint8).numpy()
    names = []
    for i, img in enumerate(pixels):
        rel = f"sub/img{i}.png" if i % 3 == 0 else f"img{i}.{'png' if i % 2 else 'bmp'}"
        Image.fromarray(img).save(src / rel)
        names.append(rel)
    eps = 0.2
    attack = create_attack("ssp", ThreatModel("linf", eps), layer="net.relu3", steps=10)
    out = perturb_folder(attack, digits_model, src, dst, batch_size=4)
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert written == sorted(str(n).rsplit(".", 1)[0] + ".png" for n in names)
    assert len(out.files) == 10 and out.change_rate > 0
    for source, target in zip(out.sources, out.files):
        before = np.asarray(Image.open(source), dtype=np.float64) / 255
        after = np.asarray(Image.open(target), dtype=np.float64) / 255
        assert after.shape == before.shape
        change = np.abs(after - before).max()
        assert change <= eps + 1e-6, change  # rounded towards the clean image: inside the ball
        assert change <= eps + 1 / 255
    assert sum(np.abs(np.asarray(Image.open(t), dtype=float) - np.asarray(Image.open(s), dtype=float)).sum() > 0
               for s, t in zip(out.sources, out.files)) == 10
    with pytest.raises(RobustlabError):
        perturb_folder(attack, digits_model, src, src / "inside")


# ---------------------------------------------------------------------- BPDA and EOT


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 3) / 3  # 4 grey levels: zero gradient almost everywhere


def test_bpda_forward_and_backward():
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    layer = bpda(_quantize)
    out = layer(x)
    assert torch.equal(out, _quantize(x.detach()))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.ones_like(x))  # straight-through
    (g,) = torch.autograd.grad(bpda(_quantize, lambda z: z.square())(x).sum(), x)
    torch.testing.assert_close(g, 2 * x.detach())
    with pytest.raises(RobustlabError):
        bpda(lambda z: z.flatten(1))(x)  # straight-through needs the shape kept


def test_bpda_restores_pgd_against_a_masking_defense(digits_model, batch):
    x, y, _ = batch
    defended = Pipeline(_quantize, digits_model)
    right = predict(defended, x) == y
    x, y = x[right], y[right]
    threat = ThreatModel("linf", 0.2)
    masked = create_attack("pgd", threat, steps=10).run(defended, x, y, gen())
    assert masked.success.float().mean() < 0.1  # gradients are zero: PGD is fooled
    adaptive = create_attack("pgd", threat, steps=10).run(Pipeline(bpda(_quantize), digits_model), x, y, gen())
    assert bool(threat.contains(adaptive.x_adv, x).all())
    # Judged on the real (non-differentiable) defense: BPDA breaks it.
    broken = predict(defended, adaptive.x_adv) != y
    assert torch.equal(broken, adaptive.success)
    assert broken.float().mean() > 0.8


class _NoiseDefense(nn.Module):
    """Adds Gaussian noise (its own seeded generator), then clips: a randomized defense."""

    def __init__(self, sigma: float, seed: int) -> None:
        super().__init__()
        self.sigma = sigma
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn(x.shape, generator=self.generator)).clamp(0, 1)


class _EOTPGD(PGD):
    """PGD whose gradients (and success checks) average ``draws`` passes, through the base helper."""

    draws = 1

    def loss_and_grad(self, model, x, y, loss, eot=1):
        return super().loss_and_grad(model, x, y, loss, eot=self.draws)


def test_eot_beats_a_single_draw_on_a_randomized_defense(digits_model, batch):
    x, y, _ = batch
    defended = Pipeline(_NoiseDefense(0.2, seed=0), digits_model)

    def expected_error(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return torch.stack([(defended(x_adv).argmax(1) != y).float() for _ in range(20)]).mean().item()

    rates = {}
    for draws in (1, 10):
        attack = _EOTPGD(ThreatModel("linf", 0.15), steps=10, random_start=False)
        attack.draws = draws
        rates[draws] = expected_error(attack.run(defended, x, y, gen()).x_adv)
    assert rates[10] > rates[1] + 0.1, rates


def test_registry_names_and_configs():
    assert {"spsa", "nes", "hopskipjump", "transfer", "ssp"} <= set(ATTACKS.names())
    kinds = {"spsa": "score-based", "nes": "score-based", "hopskipjump": "decision-based", "transfer": "transfer"}
    for name, kind in kinds.items():
        assert ATTACKS.get(name).kind == kind
    attack = create_attack("transfer", ThreatModel("linf", 0.1), surrogate="m.safetensors", steps=3)
    cfg = attack.config()
    assert cfg["kind"] == "transfer" and cfg["params"]["surrogate"] == "m.safetensors"
    rebuilt = create_attack(cfg["name"], ThreatModel(**cfg["threat"]), **cfg["params"])
    assert rebuilt.params == attack.params
    assert create_attack("ssp", ThreatModel("linf", 0.1), feature_model="m.safetensors").config()["kind"] == "transfer"
    assert copy.deepcopy(create_attack("hopskipjump", ThreatModel("l2", 1.0))).params["queries"] == 5000
