"""Perturbation sequences (ImageNet-P style) and their stability metrics: frames, determinism, small
steps, flip probability (noise sequences against the first frame), top-5 distance, FR / mFR."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from robustlab.corruptions.perturbations import (
    PERTURBATION_SUITE,
    PERTURBATIONS,
    Perturbation,
    create_perturbation,
    sequence_stability,
    top5_distance,
)
from robustlab.errors import RobustlabError
from robustlab.eval.metrics import FlipRate


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 36, 36), 5, stride=1)  # smooth 32 px images
    return x


@pytest.mark.parametrize("name", PERTURBATION_SUITE)
def test_sequences_are_deterministic_and_change_a_little_per_frame(name, images):
    p = create_perturbation(name, frames=8)
    a = list(p.frames(images, torch.Generator().manual_seed(3)))
    b = list(p.frames(images, torch.Generator().manual_seed(3)))
    assert len(a) == 8 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(f.shape == images.shape and f.min() >= 0 and f.max() <= 1 for f in a)
    steps = [(a[t] - a[t - 1]).abs().mean().item() for t in range(1, 8)]
    assert max(steps) > 0
    if not p.noise:  # a drift: neighbouring frames are closer than the ends of the sequence
        assert max(steps) < (a[-1] - a[0]).abs().mean().item()
    if name in ("translate", "rotate", "scale", "tilt", "zoom_blur"):
        assert torch.allclose(a[0], images, atol=1e-5)  # the sequence starts at the image


def test_bad_parameters():
    with pytest.raises(RobustlabError, match="frames must be >= 2"):
        create_perturbation("rotate:frames=1")
    with pytest.raises(RobustlabError, match="unknown perturbation 'wobble'"):
        create_perturbation("wobble")


def test_top5_distance_by_hand():
    prev_rank = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # class k ranked k
    assert top5_distance(prev_rank, torch.tensor([[0, 1, 2, 3, 4]])).item() == 0
    assert top5_distance(prev_rank, torch.tensor([[1, 0, 2, 3, 4]])).item() == 2  # top two swapped
    # the former first falls out of the top 5: the others move up one place each (the 6th comes in)
    assert top5_distance(prev_rank, torch.tensor([[1, 2, 3, 4, 5]])).item() == 5
    assert top5_distance(prev_rank, torch.tensor([[9, 8, 7, 6, 5]])).item() == 5 + 4 + 3 + 2 + 1  # ranks 10..6 count as 6


class _Brightness(torch.nn.Module):
    """Class 1 when the mean pixel is above 0.5, else class 0 (ten classes)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 0.5 - m
        logits[:, 1] = m - 0.5
        logits[:, 2:] = -1 - torch.arange(8).float()
        return logits


def _alternating(noise: bool) -> Perturbation:
    name = f"test_alternating_{noise}"
    if name not in PERTURBATIONS:

        class Alternating(Perturbation):
            """Frames dark, bright, dark, bright, ..."""

            defaults: ClassVar[dict] = {"frames": 5, "step": 1.0}

            def frame(self, x, t, state, generator):
                return torch.full_like(x, 0.2 if t % 2 == 0 else 0.8)

        Alternating.name, Alternating.noise = name, noise
        PERTURBATIONS.register(name)(Alternating)
    return PERTURBATIONS.get(name)()


def test_flip_probability_counts_pairs_and_noise_compares_with_the_first_frame(images):
    drift = sequence_stability(_Brightness(), images, _alternating(False))
    noise = sequence_stability(_Brightness(), images, _alternating(True))
    assert drift["flips"].tolist() == [4] * 4 and drift["pairs"].tolist() == [4] * 4  # every pair flips
    assert noise["flips"].tolist() == [2] * 4  # frames 2 and 4 differ from frame 1, frames 3 and 5 do not
    assert drift["t5d"].tolist() == [8] * 4  # top two swap at each pair: distance 2


def test_flip_rate_against_a_baseline():
    m = FlipRate().update("a", [1, 0], [2, 0], [10, 10]).update("b", [5, 5], [10, 10], [10, 10])
    out = m.compute({"a": {"flip_probability": 0.1, "t5d": 0.2}, "b": {"flip_probability": 0.25, "t5d": 1.0}})
    assert out["per_perturbation"]["a"]["flip_probability"] == pytest.approx(0.05)
    assert out["flip_rate"] == pytest.approx({"a": 0.5, "b": 2.0})
    assert out["mfr"] == pytest.approx(1.25) and out["mt5d"] == pytest.approx((0.5 + 1.0) / 2)
    merged = FlipRate().update("a", [1], [2], [10]).merge(FlipRate().update("a", [0], [0], [10]))
    assert merged.counts == {"a": [20, 1, 2]}


def test_stability_over_a_data_set_with_a_baseline(images):
    from robustlab.data import ImageDataset
    from robustlab.eval.stability import perturbation_stability

    data = ImageDataset("toy", "test", images * 0.9, torch.zeros(4, dtype=torch.long), [str(i) for i in range(10)])
    model = _Brightness()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # a device to run on
    a = perturbation_stability(model, data, ("brightness", "rotate"), frames=40, batch_size=4)
    b = perturbation_stability(model, data, ("brightness", "rotate"), frames=40, batch_size=2,
                               baseline=a["per_perturbation"])
    # brightness rises through 0.5 mean: each image flips once in 39 pairs (deterministic: no batch effect)
    assert a["per_perturbation"]["brightness"]["flip_probability"] == pytest.approx(1 / 39)
    assert b["per_perturbation"]["brightness"] == a["per_perturbation"]["brightness"]
    assert b["flip_rate"]["brightness"] == pytest.approx(1.0)
