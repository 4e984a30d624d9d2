"""The 19 ImageNet-C-style corruptions: registry and order, shapes and ranges, determinism from the
generator, severity ordering, grey images, bad input, and their building blocks against the
libraries the reference code used (scipy, Pillow; OpenCV where installed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from robustlab.corruptions import CORRUPTIONS, create_corruption, suite, textures
from robustlab.corruptions.blur import glass_swap
from robustlab.corruptions.imaging import (
    box_resize,
    canny,
    clipped_zoom,
    gaussian_blur,
    motion_blur,
)
from robustlab.errors import RobustlabError

IMAGENET_C = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression"]
EXTRA = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
ALL = IMAGENET_C + EXTRA

# Where the published constants do not make the mean absolute change grow with every severity step
# (the property below holds for every other corruption and table):
NOT_MONOTONE = {
    "glass_blur": "sigma, swap distance and sweeps vary in opposite directions between severities",
    "elastic_transform": "the random affine part shrinks while the elastic part grows",
    "frost": "the image weight falls as the frost weight rises; their changes partly cancel",
    "saturate": "severities 1-2 desaturate, 3-5 oversaturate",
    "spatter": "severities 1-3 are water drops, 4-5 mud",
    "snow": "at 224 px severity 3 has fewer flakes (threshold 0.9) than severity 2",
    "motion_blur": "at 32 px severities 3 and 4 differ only by kernel taps of weight < 0.003",
}


def natural(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images with fine texture, values spread over [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    band = gaussian_blur(torch.randn(n, channels, size, size, generator=g), size / 12)
    band = (band - band.mean((2, 3), keepdim=True)) / band.std((2, 3), keepdim=True)
    return (0.5 + 0.22 * band + 0.03 * torch.randn(n, channels, size, size, generator=g)).clamp(0, 1)


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_nineteen_are_registered_in_the_published_order():
    assert suite("imagenet-c") == IMAGENET_C
    assert suite("imagenet-c-extra") == EXTRA
    assert suite("all-c") == ALL
    for name in ALL:
        cls = CORRUPTIONS.get(name)
        assert set(cls.tables) == {32, 64, 224}
        assert all(len(rows) == 5 for rows in cls.tables.values())
    # spot checks of the published constants, 224 / 64 / 32 px
    assert CORRUPTIONS.get("gaussian_noise").tables[224] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert CORRUPTIONS.get("shot_noise").tables[32] == (500, 250, 100, 75, 50)
    assert CORRUPTIONS.get("jpeg_compression").tables[64] == (65, 58, 50, 40, 25)
    assert CORRUPTIONS.get("elastic_transform").tables[224][0] == pytest.approx((488, 170.8, 24.4))


@pytest.mark.parametrize("name", ALL)
def test_shape_range_dtype_and_determinism(name):
    x = natural(3, 32).double()
    before = x.clone()
    for severity in (1, 3, 5):
        c = create_corruption(name, severity)
        a = c(x, gen(7))
        assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device
        assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, c(x, gen(7))), "the same generator state must give the same output"
        b = c(x, gen(8))
        if c.randomized:
            assert not torch.equal(a, b), "a randomized corruption must depend on the generator"
        else:
            assert torch.equal(a, b), "a deterministic corruption must not depend on the generator"
        assert (a - x.float()).abs().mean() > 1e-3, "every severity changes the image"
    assert torch.equal(x, before), "the input is never modified"


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", ALL)
def test_severity_increases_the_change(name, size):
    if name in NOT_MONOTONE and (name not in ("snow", "motion_blur") or size == {"snow": 224, "motion_blur": 32}[name]):
        pytest.skip(NOT_MONOTONE[name])
    x = natural(6 if size == 32 else 2, size)
    change = [(create_corruption(name, s)(x, gen()) - x).abs().mean().item() for s in range(1, 6)]
    assert all(b > a for a, b in itertools.pairwise(change)), change


def test_the_table_follows_the_image_size_or_the_table_parameter():
    c = create_corruption("gaussian_noise", 5)
    assert c.table_entry(32) == 0.10 and c.table_entry(63) == 0.10
    assert c.table_entry(64) == 0.18 and c.table_entry(223) == 0.18 and c.table_entry(500) == 0.38
    assert create_corruption("gaussian_noise:severity=5,table=224").table_entry(32) == 0.38


def test_rectangular_images_use_the_shorter_side():
    x = natural(2, 56)[..., 8:48, :]  # 40 x 56
    for name in ALL:
        y = create_corruption(name, 3)(x, gen())
        assert y.shape == x.shape and torch.isfinite(y).all() and (y - x).abs().mean() > 1e-3, name


@pytest.mark.parametrize("name", ALL)
def test_grey_images(name):
    x = natural(2, 32, channels=1)
    y = create_corruption(name, 4)(x, gen())
    assert y.shape == x.shape and torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    if name == "saturate":
        assert torch.equal(y, x), "grey images have no saturation to change"
    else:
        assert (y - x).abs().mean() > 1e-3


def one_line_error(fn) -> str:
    with pytest.raises(RobustlabError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and text
    return text


def test_bad_input_gives_one_clear_line():
    assert "pixelated" in one_line_error(lambda: create_corruption("pixelated"))
    for bad in (0, 6):
        assert "severity must be 1, 2, 3, 4 or 5" in one_line_error(lambda b=bad: create_corruption("fog", b))
    small = one_line_error(lambda: create_corruption("motion_blur", 2)(torch.rand(1, 3, 16, 16)))
    assert "32 px, 64 px, 224 px" in small and "16 px" in small
    assert "table=100" in one_line_error(lambda: create_corruption("snow:table=100"))
    assert "(N, C, H, W)" in one_line_error(lambda: create_corruption("snow")(torch.rand(3, 32, 32)))


def test_frost_textures_are_recorded_and_work_without_the_package(monkeypatch):
    procedural = create_corruption("frost:severity=3,textures=procedural")
    assert procedural.config()["params"]["textures"] == "procedural"
    x = natural(2, 64)
    y = procedural(x, gen())
    assert y.shape == x.shape and (y - x).abs().mean() > 0.05
    banks = textures.frost_textures("procedural")
    assert len(banks) == 6 and all(t.shape[0] == 3 and tuple(t.shape[1:]) == (320, 480) for t in banks)
    monkeypatch.setattr(textures, "package_folder", lambda: None)
    assert create_corruption("frost").params["textures"] == "procedural"
    assert "imagecorruptions" in one_line_error(lambda: create_corruption("frost:textures=package"))


def test_glass_blur_moves_are_the_sequential_sweep_exactly():
    rng = np.random.default_rng(0)
    for h, w, d in ((12, 15, 1), (14, 13, 2)):
        x = torch.from_numpy(rng.integers(0, 256, (2, 3, h, w)).astype(np.float32))
        s = (h - 2 * d) * (w - 2 * d)
        offsets = [torch.from_numpy(rng.integers(-d, d, (2, s, 2))) for _ in range(2)]
        ref = x.clone()
        for n in range(2):
            for off in offsets:
                k = 0
                for i in range(h - d, d, -1):
                    for j in range(w - d, d, -1):
                        dx, dy = off[n, k].tolist()
                        k += 1
                        # the reference's "swap" of NumPy views: (h, w) takes the value at (h', w')
                        ref[n, :, i, j], ref[n, :, i + dy, j + dx] = ref[n, :, i + dy, j + dx], ref[n, :, i, j]
        assert torch.equal(glass_swap(x, d, offsets), ref)


def test_building_blocks_match_scipy_and_pillow():
    from PIL import Image
    from scipy.ndimage import gaussian_filter, zoom

    rng = np.random.default_rng(1)
    img = rng.random((3, 30, 30))
    for sigma, mode, smode in ((0.7, "edge", "nearest"), (6.0, "symmetric", "reflect")):
        ref = gaussian_filter(img, (0, sigma, sigma), mode=smode, truncate=3.0)
        out = gaussian_blur(torch.from_numpy(img)[None], sigma, mode, 3.0)[0].numpy()
        assert np.abs(out - ref).max() < 1e-12
    for z in (1.07, 1.75, 3.0):
        crop = int(np.ceil(30 / z))
        top = (30 - crop) // 2
        big = zoom(img[:, top:top + crop, top:top + crop], (1, z, z), order=1)
        t = (big.shape[1] - 30) // 2
        out = clipped_zoom(torch.from_numpy(img)[None], z)[0].numpy()
        assert np.abs(out - big[:, t:t + 30, t:t + 30]).max() < 1e-6
    plane = rng.random((30, 30)).astype(np.float32)
    for size in (18, 13):
        small = np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.BOX))
        out = box_resize(torch.from_numpy(plane)[None, None], (size, size))[0, 0].numpy()
        assert np.abs(out - small).max() < 1e-6


def test_motion_blur_kernel_and_canny_match_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    liquid = (np.clip(gaussian_filter_np(rng.normal(0.65, 0.3, (40, 40)), 1.0), 0, 1) * 255).astype(np.uint8)
    ours = canny(torch.from_numpy(liquid).float()[None], 50, 150)[0].numpy()
    assert np.array_equal(ours, cv2.Canny(liquid, 50, 150) > 0)
    # a blur at angle 0 of one bright column: the one-sided Gaussian taps, trailing to the left
    x = torch.zeros(1, 1, 5, 9)
    x[..., 6] = 1.0
    out = motion_blur(x, 2, 1.0, torch.tensor([0.0]))[0, 0, 0]
    taps = np.exp(-np.arange(5) ** 2 / 2.0)
    assert np.allclose(out[2:7].numpy(), (taps / taps.sum())[::-1], atol=1e-6)
    assert out[7:].abs().max() == 0


def gaussian_filter_np(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma, mode="nearest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_inputs_stay_on_the_device():
    x = natural(2, 32).cuda()
    for name in ALL:
        y = create_corruption(name, 3)(x, torch.Generator(device="cuda").manual_seed(0))
        assert y.device == x.device and y.shape == x.shape
