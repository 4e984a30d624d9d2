"""The equivariance defense (Mao et al.): the correction's budget and box, what it optimises, its
determinism and cost, dense models, the adaptive attacks it declares, and its error lines."""

from __future__ import annotations

import pytest
import torch
from helpers import gen
from torch import nn

from robustlab.attacks import create_attack
from robustlab.attacks.base import eot_gradient, model_objective
from robustlab.defenses import apply_defenses, create_defense
from robustlab.defenses.equivariance_views import (
    ViewSettings,
    apply_views,
    back_to_reference,
    draw_views,
)
from robustlab.errors import RobustlabError
from robustlab.eval import EvalOptions, ResultsStore, evaluate
from robustlab.eval.runner import adaptive_attacks
from robustlab.predictor import predict
from robustlab.threat import ThreatModel

EPS = 0.1
FAST = "steps=6,views=4"  # the paper's 20 steps x 8 views in the benchmark; a few here


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[:32].contiguous(), digits_test.y[:32].contiguous()


def defended(model, spec: str = FAST):
    return apply_defenses(model, [f"equivariance:eps={EPS},{spec}"])


def mean_loss(defense, x: torch.Tensor, draws: int = 4) -> float:
    """The equivariance loss averaged over images and a few fixed draws of views."""
    with torch.no_grad():
        return sum(float(defense.equivariance_loss(x, gen(100 + s)).mean()) for s in range(draws)) / draws


def test_correction_stays_in_its_budget_and_the_box(digits_model, batch):
    x, _ = batch
    d = defended(digits_model).defenses[0]
    assert d.budget == pytest.approx(1.5 * EPS)
    xc = d.transform(x, gen(0))
    assert xc.shape == x.shape
    assert float((xc - x).abs().max()) <= d.budget + 1e-6
    assert float(xc.min()) >= 0.0 and float(xc.max()) <= 1.0
    assert float((xc - x).abs().max()) > 0.5 * d.budget  # it does move the image


def test_correction_reduces_the_equivariance_loss(digits_model, batch):
    x, _ = batch
    model = defended(digits_model, "steps=10,views=4,keep=1.0")
    d = model.defenses[0]
    before = mean_loss(d, x)
    after = mean_loss(d, d.transform(x, gen(1)))
    assert after < before - 0.02, (before, after)
    # on adversarial inputs too (a plain PGD against the undefended model)
    x_adv = create_attack("pgd", ThreatModel("linf", EPS), steps=10).run(digits_model, x, batch[1], gen(2)).x_adv
    assert mean_loss(d, d.transform(x_adv, gen(3))) < mean_loss(d, x_adv) - 0.02


def test_deterministic_given_the_generator(digits_model, batch):
    x, _ = batch
    d = defended(digits_model).defenses[0]
    a, b, c = d.transform(x, gen(7)), d.transform(x, gen(7)), d.transform(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cost_counter_and_batching(digits_model, batch):
    """One batched pass per step over every image and view: steps x (views + 1) passes per image."""
    x, _ = batch
    d = defended(digits_model).defenses[0]
    calls: list[int] = []
    handle = digits_model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    try:
        d.reset_cost()
        d.transform(x, gen(0))
    finally:
        handle.remove()
    n = x.shape[0]
    assert d.passes_per_image == 6 * 5
    assert d.cost == {"calls": 1, "images": n, "passes": n * 6 * 5}
    assert calls == [1] + [n * 5] * 6  # a one-image probe finds the default layer, then one pass per step
    calls.clear()
    handle = digits_model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    try:
        d.transform(x, gen(1))
    finally:
        handle.remove()
    assert calls == [n * 5] * 6 and d.cost["passes"] == 2 * n * 30
    assert d.layer_name == "net.pool2"  # the penultimate spatial stage of digits_cnn


class DenseToy(nn.Module):
    """A tiny fully convolutional segmenter: (N, 1, H, W) -> (N, classes, H, W) logits."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_dense_model(digits_test):
    x = digits_test.x[:16]
    model = DenseToy().eval()
    dm = apply_defenses(model, [f"equivariance:eps={EPS},steps=10,views=4,keep=1.0"])
    d = dm.defenses[0]
    xc = d.transform(x, gen(0))
    assert d.layer_name == "body.3"  # the last spatial map before the output layer, not the output
    assert float((xc - x).abs().max()) <= d.budget + 1e-6
    assert mean_loss(d, xc) < mean_loss(d, x) - 0.01
    with torch.no_grad():  # the corrected image segmented: dense logits
        assert model(dm.defenses[0].transform(x, gen(1))).shape == (16, 3, 8, 8)


def test_runs_in_the_segmentation_protocol(tmp_path):
    from robustlab.data import load_dataset
    from robustlab.eval.runner import segment

    data = load_dataset("scenes-digits", "test").subset(8)
    model = apply_defenses(DenseToy(classes=data.num_classes).eval(), ["equivariance:eps=0.05,steps=2,views=2,eot=2"])
    with ResultsStore(tmp_path / "s.db") as store:
        res = segment(model, data, [create_attack("pgd", ThreatModel("linf", 0.05), steps=2)], store, batch_size=8,
                      progress=False)
    s = res.summary
    assert s["defenses"][0]["name"] == "equivariance"
    assert 0.0 <= s["robust_miou"] <= 1.0 and 0.0 <= s["clean_miou"] <= 1.0


def test_feature_maps_go_back_to_the_image_frame(digits_test):
    """A pointwise feature map is exactly flip-equivariant: mapped back, the views agree (loss 0);
    under rotations and crops they agree where the view saw the image, up to resampling."""
    x = digits_test.x[:8]
    point = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    d = create_defense("equivariance", eps=EPS, keep=1.0, transforms="flip", layer="1")
    d.bind(point)
    with torch.no_grad():
        assert float(d.equivariance_loss(x, gen(0)).max()) < 1e-5
    views = draw_views(8, 4, ViewSettings(("rotate", "crop")), gen(1), x.device, x.dtype)
    with torch.no_grad():
        f = point[:2](x)
        back, seen = back_to_reference(point[:2](apply_views(x, views)), views)
    ref = f.repeat(4, 1, 1, 1)
    inside = seen.expand_as(back) > 0
    assert float((back - ref)[inside].abs().mean()) < 0.35 * float(ref[inside].abs().mean())
    vector = back_to_reference(torch.ones(32, 5), views)
    assert vector[1] is None and vector[0].shape == (32, 5)


def test_adaptive_attack_beats_the_non_adaptive_one(digits_model, batch):
    """The non-adaptive attacker differentiates the defended pipeline as it is: the correction's
    output carries no gradient (BPDA declared), so his attack finds nothing; BPDA through the
    correction with EOT breaks points."""
    x, y = batch
    model = defended(digits_model, "steps=4,views=2,factor=0.5,eot=2")
    threat = ThreatModel("linf", 0.25)
    attack = create_attack("pgd", threat, steps=10)
    model.set_generator(gen(5))
    naive = attack.run(model.naive(), x, y, gen(0))
    adaptive = adaptive_attacks([attack], model.needs())[0]
    assert adaptive.params["eot"] == 2
    strong = adaptive.run(model, x, y, gen(0))
    robust_naive = float((predict(model, naive.x_adv, gen(9)) == y).float().mean())
    robust_adaptive = float((predict(model, strong.x_adv, gen(9)) == y).float().mean())
    assert robust_adaptive < robust_naive - 0.2, (robust_naive, robust_adaptive)


def test_declarations_and_the_penalty(digits_model, batch):
    x, _ = batch
    plain = defended(digits_model)
    needs = plain.needs()
    assert needs.eot == 4 and needs.bpda == ("equivariance",) and needs.through == () and needs.penalty == ()
    assert plain.attack_penalty(x[:4]) is None
    unrolled = defended(digits_model, FAST + ",attack=unrolled").needs()
    assert unrolled.bpda == () and unrolled.through == ("equivariance",)
    weighted = defended(digits_model, FAST + ",adaptive_weight=2")
    assert weighted.needs().penalty == ("equivariance",)
    assert "loss minus the objective of equivariance" in weighted.needs().describe()
    # the penalty is the weight times the equivariance loss, drawn from the defended model's generator
    weighted.set_generator(gen(3))
    penalty = weighted.attack_penalty(x[:4])
    assert torch.allclose(penalty, 2 * weighted.defenses[0].equivariance_loss(x[:4], gen(3)))


def test_attacks_subtract_a_models_penalty():
    class Penalized(nn.Module):
        def forward(self, z):
            return z.flatten(1)[:, :3]

        def attack_penalty(self, z):
            return 0.5 * z.flatten(1).sum(dim=1)

    z = torch.rand(2, 1, 2, 2)
    forward, value = model_objective(Penalized(), lambda out: out[:, 0], 2)
    _, v, g = eot_gradient(forward, value, z)
    assert torch.allclose(v, z.flatten(1)[:, 0] - 0.5 * z.flatten(1).sum(dim=1))
    assert torch.allclose(g.flatten(1), torch.tensor([[0.5, -0.5, -0.5, -0.5]] * 2))


def test_unrolled_gradient_flows_through_the_correction(digits_model, batch):
    x, y = batch
    model = defended(digits_model, "steps=3,views=2,attack=unrolled,noise=0")
    model.set_generator(gen(0))
    xr = x[:6].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xr), y[:6])
    (g_unrolled,) = torch.autograd.grad(loss, xr)
    bpda = defended(digits_model, "steps=3,views=2,noise=0")
    bpda.set_generator(gen(0))
    xb = x[:6].clone().requires_grad_(True)
    (g_bpda,) = torch.autograd.grad(nn.functional.cross_entropy(bpda(xb), y[:6]), xb)
    assert torch.isfinite(g_unrolled).all() and float(g_unrolled.abs().sum()) > 0
    assert not torch.allclose(g_unrolled, g_bpda)  # second-order terms of the unrolled steps


def test_runs_in_the_adversarial_protocol(digits_model, batch, tmp_path):
    x, y = batch
    from robustlab.data import ImageDataset

    data = ImageDataset("digits", "test", x[:24], y[:24], [str(i) for i in range(10)])
    model = defended(digits_model, "steps=3,views=2,eot=2")
    attack = create_attack("pgd", ThreatModel("linf", EPS), steps=3)
    with ResultsStore(tmp_path / "r.db") as store:
        res = evaluate(model, data, [attack], store, options=EvalOptions(sanity=False, steps_grid=(), batch_size=24),
                       progress=False)
    s = res.summary
    assert s["defenses"][0]["name"] == "equivariance"
    assert s["attacks"][0]["params"]["eot"] == 2
    assert s["non_adaptive"]["transfer_robust_accuracy"] is not None
    assert 0.0 <= s["robust_accuracy"] <= s["clean_accuracy"] <= 1.0


@pytest.mark.parametrize("spec,message", [
    ("equivariance:eps=0.1,layer=nope", "the model has no layer 'nope' (its layers: normalize, net, net.conv1"),
    ("equivariance", "give eps, the attack's Linf epsilon"),
    ("equivariance:eps=0.1,transforms=flip+warp", "transforms must be a list of flip, crop, rotate, color"),
    ("equivariance:eps=0.1,attack=magic", "attack='magic' is not one of bpda, unrolled"),
])
def test_error_lines(digits_model, spec, message):
    with pytest.raises(RobustlabError) as err:
        apply_defenses(digits_model, [spec])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_without_a_model_and_eps_as_a_fraction():
    d = create_defense("equivariance", eps="8/255")
    assert d.budget == pytest.approx(1.5 * 8 / 255)
    with pytest.raises(RobustlabError, match="runs the model"):
        d.transform(torch.rand(2, 1, 8, 8), gen(0))
