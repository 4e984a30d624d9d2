"""The second part of the attack catalogue: Boundary, OnePixel, Pixle, the spatial attacks, universal
perturbations and adversarial patches, and the threat kinds they live in.

What is checked, on the digits CNN: every attack stays in its threat model and the box; it breaks
the standard model as expected; per-sample query and gradient counts add up to what the model
really saw; broken points stop early; a universal perturbation is one perturbation for all images
(and the check catches one that is not); a patch changes pixels inside one square only; spatial
points are rotations/translations within the bounds, re-rendered exactly from their parameters;
bad parameters and threat models raise one clear RobustlabError.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from robustlab.attacks import ATTACKS, create_attack
from robustlab.attacks.fab import min_norm_to_hyperplane
from robustlab.attacks.spatial import spatial_grid
from robustlab.errors import RobustlabError
from robustlab.eval.structured import evaluate_patch, evaluate_spatial, evaluate_universal
from robustlab.threat import ThreatModel
from robustlab.threat_kinds import PatchThreat, SpatialThreat, UniversalThreat, threat_from_dict
from helpers import gen, linear_digits_classifier, predict


class Counting(nn.Module):
    """The model, counting the images it is given and those with a graph to the input or params."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.grad_images = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_images += x.shape[0]
        return self.model(x)


@pytest.fixture(scope="module")
def data(digits_model, digits_test):
    """(model, 40 correctly classified digits test images, labels)."""
    x, y = digits_test.x, digits_test.y
    correct = (predict(digits_model, x) == y).nonzero()[:40, 0]
    return digits_model, x[correct].contiguous(), y[correct].contiguous()


def test_registered_with_kinds():
    kinds = {"boundary": "decision-based", "onepixel": "score-based", "pixle": "score-based",
             "spatial-grid": "white-box", "spatial-fo": "white-box", "uap": "white-box", "patch": "white-box"}
    for name, kind in kinds.items():
        assert name in ATTACKS.names()
        assert ATTACKS.get(name).kind == kind


# ---------------------------------------------------------------------- Boundary


def test_boundary_breaks_all_shrinks_with_queries_and_counts_exactly(data):
    model, x, y = data
    x, y = x[:8], y[:8]
    dists = []
    for budget in (100, 700):
        counted = Counting(model)
        res = create_attack("boundary", ThreatModel("l2", 1.0), queries=budget).run(counted, x, y, gen(0))
        assert res.success.all() and (predict(model, res.x_adv) != y).all()
        assert ((res.x_adv >= 0) & (res.x_adv <= 1)).all()
        assert int(res.forwards.sum()) == counted.images and int(res.forwards.max()) <= budget
        assert int(res.gradients.sum()) == 0 and counted.grad_images == 0
        dists.append((res.x_adv - x).flatten(1).norm(dim=1))
    assert float(dists[1].median()) < 0.9 * float(dists[0].median())
    assert (dists[1] <= dists[0] + 1e-6).float().mean() > 0.8


def test_boundary_stops_when_converged_and_on_already_adversarial(data):
    model, x, y = data
    # A convergence threshold above the first source step ends the walk right after the start.
    res = create_attack("boundary", ThreatModel("l2", 1.0), queries=5000, convergence=0.5).run(model, x[:5], y[:5], gen(0))
    assert res.success.all() and int(res.forwards.max()) < 100
    wrong = (y[:5] + 1) % 10  # labels the model does not predict: the clean point is already adversarial
    res = create_attack("boundary", ThreatModel("l2", 1.0), queries=500).run(model, x[:5], wrong, gen(0))
    assert res.success.all() and torch.equal(res.x_adv, x[:5]) and (res.forwards == 1).all()


# ---------------------------------------------------------------------- OnePixel and Pixle


def _changed_pixels(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((x_adv - x).abs() > 0).any(dim=1).flatten(1).sum(dim=1)


@pytest.mark.parametrize("pixels", [1, 3])
def test_onepixel_changes_at_most_its_pixels_and_counts(data, pixels):
    model, x, y = data
    counted = Counting(model)
    attack = create_attack("onepixel", ThreatModel("linf", 1.0), pixels=pixels, steps=8, popsize=30)
    res = attack.run(counted, x, y, gen(0))
    assert (_changed_pixels(res.x_adv, x) <= pixels).all()
    assert torch.equal(res.success, predict(model, res.x_adv) != y)
    assert int(res.forwards.sum()) == counted.images and counted.grad_images == 0
    if pixels == 3:
        assert res.success.float().mean() >= 0.3  # 8x8 digits: three pixels break many
    # Early stop: a broken sample spends at most what an unbroken one does, most spend less.
    full = 30 * 9 if pixels == 3 else 30 * 9
    assert int(res.forwards.max()) <= full
    if res.success.any():
        assert float(res.forwards[res.success].float().mean()) < full


def test_pixle_moves_pixels_of_the_image_itself_and_stops_early(data):
    model, x, y = data
    counted = Counting(model)
    attack = create_attack("pixle", ThreatModel("linf", 1.0), restarts=5, iterations=5, x_dimensions=[1, 2],
                           y_dimensions=[1, 2])
    res = attack.run(counted, x, y, gen(0))
    assert res.success.float().mean() >= 0.5
    assert torch.equal(res.success, predict(model, res.x_adv) != y)
    assert int(res.forwards.sum()) == counted.images
    assert int(res.forwards.max()) <= 1 + 25
    assert float(res.forwards[res.success].float().mean()) < 26
    # Every changed pixel holds a value that some pixel of the clean image has, at most 4 changed
    # per iteration (2x2 patches).
    for i in range(len(y)):
        changed = ((res.x_adv[i] - x[i]).abs() > 0).any(dim=0)
        values = res.x_adv[i][:, changed].t()
        pool = x[i].flatten(1).t()
        assert all(bool((pool == v).all(dim=1).any()) for v in values)
        assert int(changed.sum()) <= 4 * int(res.forwards[i])


# ---------------------------------------------------------------------- spatial


def test_spatial_apply_moves_content_as_said():
    t = SpatialThreat(90, 2)
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 2, 6] = 1.0
    assert t.apply(img, torch.tensor([[0.0, 1.0, 0.0]]))[0, 0].nonzero().tolist() == [[2, 7]]
    assert t.apply(img, torch.tensor([[0.0, 0.0, 2.0]]))[0, 0].nonzero().tolist() == [[4, 6]]
    rot = t.apply(img, torch.tensor([[90.0, 0.0, 0.0]]))[0, 0]
    assert (rot > 0.99).nonzero().tolist() == [[2, 2]]  # 90 degrees counter-clockwise about the centre
    assert torch.allclose(t.apply(img, torch.zeros(1, 3)), img)


@pytest.mark.parametrize("name", ["spatial-grid", "spatial-fo"])
def test_spatial_outputs_are_transformations_within_bounds(data, name):
    model, x, y = data
    threat = SpatialThreat(20, 1.5)
    counted = Counting(model)
    res = create_attack(name, threat).run(counted, x, y, gen(0))
    assert res.params.shape == (len(y), 3)
    assert (res.params[:, 0].abs() <= 20 + 1e-6).all() and (res.params[:, 1:].abs() <= 1.5 + 1e-6).all()
    assert threat.verify(res.x_adv, x, res.params).all()
    assert torch.equal(res.success, predict(model, res.x_adv) != y)
    assert res.success.float().mean() >= 0.5
    assert int(res.forwards.sum()) == counted.images
    if name == "spatial-grid":
        assert int(res.gradients.sum()) == 0 and int(res.forwards.max()) <= 31 * 25
        assert float(res.forwards[res.success].float().mean()) < 31 * 25
    else:
        assert int(res.gradients.sum()) == counted.grad_images
        assert int(res.forwards.max()) <= 21


def test_spatial_grid_finds_the_smallest_grid_transformation_first(data):
    model, x, y = data
    grid = spatial_grid(20, 1.5, 5, 3)
    assert torch.equal(grid[0], torch.zeros(3)) and grid.shape == (45, 3)
    res = create_attack("spatial-grid", SpatialThreat(20, 1.5), angles=5, shifts=3).run(model, x, y, gen(0))
    # Each broken sample: no grid point tried before its own fools the model.
    for i in res.success.nonzero()[:5, 0].tolist():
        k = int(((grid - res.params[i]).abs().sum(dim=1) < 1e-6).nonzero()[0, 0])
        before = SpatialThreat(20, 1.5).apply(x[i : i + 1].expand(k, -1, -1, -1), grid[:k])
        assert (predict(model, before) == y[i]).all() if k else True
    assert int(res.forwards.max()) <= 45


def test_spatial_verify_rejects_other_images_and_out_of_bounds(data):
    _, x, _ = data
    t = SpatialThreat(10, 1)
    p = torch.tensor([[5.0, 0.5, -0.5]]).expand(len(x), 3)
    x_adv = t.apply(x, p)
    assert t.verify(x_adv, x, p).all()
    assert not t.verify(x_adv, x, p * 3).any()  # beyond the bounds
    assert not t.verify((x_adv + 0.01).clamp(0, 1), x, p).all()


def test_evaluate_spatial_is_worst_case_over_attacks(data):
    model, x, y = data
    t = SpatialThreat(20, 1.5)
    fo = evaluate_spatial(model, x, y, [create_attack("spatial-fo", t)], gen(0))
    both = evaluate_spatial(model, x, y, [create_attack("spatial-fo", t), create_attack("spatial-grid", t)], gen(0))
    assert both.robust_accuracy["worst case"] <= fo.robust_accuracy["worst case"]
    assert both.extras["rejected"] == 0 and both.clean_accuracy == 1.0


# ---------------------------------------------------------------------- universal


def test_uap_is_one_perturbation_for_all_images(data):
    model, x, y = data
    threat = UniversalThreat("linf", 0.3)
    counted = Counting(model)
    res = create_attack("uap", threat, epochs=20, batch_size=16).run(counted, x, y, gen(0))
    assert threat.contains(res.x_adv, x).all()
    assert threat.shared(res.x_adv, x)
    assert torch.equal(res.params, res.params[:1].expand_as(res.params))
    assert torch.allclose(res.x_adv, (x + res.params[0]).clamp(0, 1), atol=1e-6)
    assert torch.equal(res.success, predict(model, res.x_adv) != y)
    assert int(res.gradients.sum()) == counted.grad_images
    assert int(res.forwards.sum()) == counted.images
    # Far stronger than random sign noise of the same size.
    noise = (torch.randint(0, 2, x[0].shape, generator=gen(1)).float() * 2 - 1) * 0.3
    noise_fooled = (predict(model, (x + noise).clamp(0, 1)) != y).float().mean()
    assert res.success.float().mean() >= noise_fooled + 0.2
    # The check catches per-image perturbations: PGD's points are not one shared perturbation.
    pgd = create_attack("pgd", ThreatModel("linf", 0.3), steps=10).run(model, x, y, gen(0))
    assert not threat.shared(pgd.x_adv, x)


def test_uap_stops_at_its_target_fooling_rate(data):
    model, x, y = data
    res = create_attack("uap", UniversalThreat("linf", 0.4), epochs=50, batch_size=40, target_fooling=0.3).run(
        model, x, y, gen(0))
    assert res.success.float().mean() >= 0.3 and int(res.gradients.max()) < 50
    assert (res.forwards == 2 * res.gradients).all()  # one check per epoch, one step per epoch


def test_evaluate_universal_fits_on_one_set_and_reports_another(data, digits_train):
    model, x, y = data
    r = evaluate_universal(model, create_attack("uap", UniversalThreat("l2", 2.0), epochs=3),
                           digits_train.x[:200], digits_train.y[:200], x, y, gen(0))
    assert r.n == len(y) and r.robust_accuracy["universal"] < r.clean_accuracy
    assert r.extras["delta_norm"] <= 2.0 + 1e-5 and 0 < r.extras["fooling_rate"] <= 1


# ---------------------------------------------------------------------- patch


def test_patch_changes_only_one_square_and_worst_beats_random(data, digits_train):
    model, x, y = data
    threat = PatchThreat(3)
    counted = Counting(model)
    res = create_attack("patch", threat, epochs=5).run(counted, x, y, gen(0))
    assert threat.contains(res.x_adv, x).all()
    changed = ((res.x_adv - x).abs() > 0).any(dim=1)
    for i in range(len(y)):
        rows, cols = changed[i].nonzero(as_tuple=True)
        if rows.numel():
            assert int(rows.max() - rows.min()) < 3 and int(cols.max() - cols.min()) < 3
    assert torch.equal(res.success, predict(model, res.x_adv) != y)
    assert int(res.forwards.sum()) == counted.images and int(res.gradients.sum()) == counted.grad_images
    # An image changed in a 4x4 square is not in the 3x3 patch threat model.
    bad = x.clone()
    bad[:, :, 0:4, 0:4] = 1 - bad[:, :, 0:4, 0:4]
    assert not threat.contains(bad, x).any()
    r = evaluate_patch(model, create_attack("patch", threat, epochs=5), digits_train.x[:200], digits_train.y[:200],
                       x, y, draws=3, generator=gen(0))
    assert r.robust_accuracy["worst position"] <= r.robust_accuracy["random position"]
    assert r.robust_accuracy["worst position"] < 0.5


# ---------------------------------------------------------------------- errors and round trips


def test_bad_parameters_and_threats_raise_one_clear_line():
    cases = [
        lambda: create_attack("boundary", ThreatModel("linf", 0.1)),
        lambda: create_attack("boundary", ThreatModel("l2", 1.0), step_adaptation=1.0),
        lambda: create_attack("onepixel", ThreatModel("linf", 1.0), pixels=0),
        lambda: create_attack("pixle", ThreatModel("linf", 1.0), x_dimensions=[0, 2]),
        lambda: create_attack("spatial-grid", ThreatModel("linf", 0.1)),
        lambda: create_attack("patch", PatchThreat(2), locations="corner"),
        lambda: create_attack("uap", UniversalThreat("l1", 1.0)),
        lambda: SpatialThreat(200, 1),
        lambda: PatchThreat(0),
        lambda: UniversalThreat("l7", 1.0),
        lambda: create_attack("patch", PatchThreat(9)).run(nn.Flatten(), torch.zeros(1, 1, 8, 8), torch.zeros(1)),
    ]
    for case in cases:
        with pytest.raises(RobustlabError) as err:
            case()
        assert "\n" not in str(err.value)


def test_threat_kinds_round_trip_through_dicts():
    for t in (SpatialThreat(30, 3), PatchThreat(5), UniversalThreat("l2", 1.5), ThreatModel("linf", 0.1)):
        assert threat_from_dict(t.to_dict()) == t
    assert create_attack("patch", PatchThreat(5)).config()["threat"] == {"kind": "patch", "size": 5, "lower": 0.0,
                                                                          "upper": 1.0}


# ---------------------------------------------------------------------- Brendel-Bethge


@pytest.fixture(scope="module")
def linear(digits_train):
    """A linear softmax classifier on the digits (float64), where the smallest misclassifying
    perturbation is an exact projection onto a hyperplane within the box: (model, 10 correctly
    classified training images, labels)."""
    return linear_digits_classifier(digits_train.x, digits_train.y, 10)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_brendel_bethge_reaches_the_minimum_norm_on_a_linear_model(linear, norm):
    model, x, y = linear
    counted = Counting(model)
    res = create_attack("brendel-bethge", ThreatModel(norm, 1.0), steps=40, lr=0.05).run(counted, x, y, gen(0))
    assert res.success.all() and (predict(model, res.x_adv) != y).all()
    assert ((res.x_adv >= 0) & (res.x_adv <= 1)).all()
    ours = ThreatModel(norm, 1.0).distance(res.x_adv, x)
    # The exact answer: the smallest projection onto any other class's hyperplane within the box.
    w = model[1].weight.detach()
    z = model(x).detach()
    best = torch.full((len(y),), float("inf"), dtype=torch.float64)
    for j in range(10):
        wd = w[j] - w[y]  # (N, 64): the margin z_j - z_y grows along wd
        d = min_norm_to_hyperplane(wd, z.gather(1, y.view(-1, 1)).squeeze(1) - z[:, j], -x.flatten(1),
                                   1 - x.flatten(1), norm)
        reach = ((wd * d).sum(dim=1) - (z.gather(1, y.view(-1, 1)).squeeze(1) - z[:, j])).abs() < 1e-9
        size = ThreatModel(norm, 1.0).distance(d, torch.zeros_like(d))
        best = torch.where((j != y) & reach, torch.minimum(best, size), best)
    ratio = ours / best
    assert float(ratio.min()) >= 1 - 1e-6  # nothing beats the exact answer
    # Exact where it converged to the nearest hyperplane; a walk may settle on another class's
    # boundary (a local minimum of the boundary walk, as in the reference implementation).
    assert float(ratio.median()) <= 1.01 and float((ratio <= 1.025).float().mean()) >= 0.6
    assert int(res.gradients.sum()) == counted.grad_images
    assert int(res.forwards.sum()) == counted.images and (res.gradients == 40).all()
