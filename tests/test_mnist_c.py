"""The MNIST-C corruptions: names, the one severity, sizes, determinism, and fidelity to the
reference operations (scikit-image) where they are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustlab.corruptions import CORRUPTIONS, create_corruption, suite
from robustlab.corruptions.mnist_c import canny
from robustlab.data import load_dataset
from robustlab.errors import RobustlabError

RELEASED = ["shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
            "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges"]


@pytest.fixture(scope="module")
def digits28() -> torch.Tensor:
    """16 digits (sklearn's 8x8, upsampled to 28 px: MNIST-like strokes, no files needed)."""
    x = load_dataset("digits").subset(16).x
    return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


def test_suite_lists_the_fifteen_in_the_papers_order_with_prefixed_names():
    names = suite("mnist-c")
    assert names == ["mnist_" + n for n in RELEASED]
    assert [CORRUPTIONS.get(n).release_name for n in names] == RELEASED


def test_one_severity_and_clear_errors():
    assert create_corruption("mnist_fog").severity == 1
    with pytest.raises(RobustlabError, match="one severity .*give severity 1, got 3"):
        create_corruption("mnist_fog", severity=3)
    with pytest.raises(RobustlabError, match="has parameters for images of 28 px; these images are 16 px"):
        create_corruption("mnist_rotate")(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("name", ["mnist_" + n for n in RELEASED])
def test_every_corruption_is_deterministic_in_range_and_changes_the_image(name, digits28):
    c = create_corruption(name)
    a = c(digits28, generator=torch.Generator().manual_seed(1))
    b = c(digits28, generator=torch.Generator().manual_seed(1))
    assert a.shape == digits28.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - digits28).abs().mean() > 0.005
    if c.randomized:
        other = c(digits28, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(a, other)


def test_exact_operations(digits28):
    x = digits28
    assert torch.allclose(create_corruption("mnist_brightness")(x), (x + 0.5).clamp(0, 1))
    s = create_corruption("mnist_stripe")(x)
    assert torch.allclose(s[..., :7], 1 - x[..., :7]) and torch.equal(s[..., 7:21], x[..., 7:21])
    assert torch.allclose(s[..., 21:], 1 - x[..., 21:])
    t = create_corruption("mnist_translate")(x, generator=torch.Generator().manual_seed(0))
    # every image is the clean one shifted by 3 px in x and in y (zeros come in)
    for i in range(x.shape[0]):
        ok = False
        for dy in (-3, 3):
            for dx in (-3, 3):
                ref = torch.zeros_like(x[i])
                src = x[i][:, max(dy, 0): 28 + min(dy, 0), max(dx, 0): 28 + min(dx, 0)]
                ref[:, max(-dy, 0): 28 + min(-dy, 0), max(-dx, 0): 28 + min(-dx, 0)] = src
                ok |= torch.allclose(t[i], ref, atol=1e-6)
        assert ok
    d = create_corruption("mnist_dotted_line")(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d[..., :2], x[..., :2]) and torch.equal(d[..., 4:6], x[..., 4:6])  # blank columns


def test_noise_statistics():
    flat = torch.full((8, 1, 28, 28), 0.5)
    g = torch.Generator().manual_seed(0)
    shot = create_corruption("mnist_shot_noise")(flat, generator=g)
    assert abs(shot.mean().item() - 0.470) < 0.01  # E min(poisson(1.5) / 3, 1) = 0.470
    imp = create_corruption("mnist_impulse_noise")(flat, generator=g)
    assert abs((imp == 0).float().mean().item() - 0.085) < 0.01
    assert abs((imp == 1).float().mean().item() - 0.085) < 0.01


skimage = pytest.importorskip("skimage", reason="scikit-image (an imagecorruptions dependency) gives the references")


def test_canny_matches_scikit_image_exactly(digits28):
    from skimage import feature

    ref = np.stack([feature.canny(im) for im in digits28[:, 0].double().numpy()])
    assert ref.mean() > 0.05  # there are edges to find
    assert np.array_equal(canny(digits28).numpy()[:, 0].astype(bool), ref)


@pytest.mark.parametrize("name,linear", [
    ("mnist_scale", lambda s: np.diag([1 / 0.7, 1 / 0.7])),
    ("mnist_rotate", lambda s: np.array([[np.cos(s * 0.4), -np.sin(s * 0.4)], [np.sin(s * 0.4), np.cos(s * 0.4)]])),
    ("mnist_shear", lambda s: np.array([[1, -np.sin(s * 0.4)], [0, np.cos(s * 0.4)]])),
])
def test_geometric_corruptions_match_scikit_image_warp(name, linear, digits28):
    from skimage import transform

    out = create_corruption(name)(digits28, generator=torch.Generator().manual_seed(0)).numpy()[:, 0]
    for i, im in enumerate(digits28[:, 0].double().numpy()):
        errs = []
        for sign in (1, -1):
            a = linear(sign)
            m = np.eye(3)
            m[:2, :2] = a
            m[:2, 2] = 13.5 * (1 - a.sum(axis=1))
            ref = transform.warp(im, inverse_map=transform.AffineTransform(matrix=m), order=1)
            errs.append(np.abs(ref - out[i]).max())
        assert min(errs) < 1e-4


def test_glass_blur_blurs_like_the_reference(digits28):
    from skimage.filters import gaussian

    # with the swaps it stays close to twice-blurred (the swaps move pixels by at most one)
    out = create_corruption("mnist_glass_blur")(digits28, generator=torch.Generator().manual_seed(0))
    twice = np.stack([gaussian(gaussian(im, 0.7), 0.7) for im in digits28[:, 0].double().numpy()])
    assert np.abs(out.numpy()[:, 0] - twice).mean() < 0.03


def test_fog_texture_is_a_smooth_map_in_the_unit_range():
    from robustlab.corruptions import imaging

    cpu = torch.device("cpu")
    m = imaging.plasma_fractal(8, 256, 1.4, imaging.uniform_draw(torch.Generator().manual_seed(0), cpu), cpu).float()
    assert m.shape == (8, 256, 256)
    assert torch.equal(m.amin(dim=(1, 2)), torch.zeros(8)) and torch.equal(m.amax(dim=(1, 2)), torch.ones(8))
    # imagecorruptions' diamond-square gives mean 0.50, sd 0.19, neighbour step 0.008 at these settings
    assert 0.4 < m.mean().item() < 0.6 and 0.12 < m.std().item() < 0.26
    assert (m[:, :, 1:] - m[:, :, :-1]).abs().mean().item() < 0.02
