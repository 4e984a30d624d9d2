"""Input-transformation defenses: each equals its reference operation (libjpeg through PIL, scipy's
filters), randomized ones are reproducible from the generator, and the adaptive attack each declares
(BPDA with the differentiable JPEG, EOT) does what a non-adaptive one cannot."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from robustlab.attacks import create_attack
from robustlab.defenses import apply_defenses, create_defense
from robustlab.defenses.filters import gaussian_filter, median_filter
from robustlab.defenses.jpeg import _LUMA, differentiable_jpeg, quantization_table, real_jpeg
from robustlab.defenses.randomized import total_variation_minimize
from robustlab.errors import RobustlabError
from robustlab.predictor import predict
from robustlab.threat import ThreatModel


def _smooth_rgb(n: int = 8, size: int = 32) -> torch.Tensor:
    """Natural-ish RGB images: smooth random fields (JPEG and filters behave as on photos)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def test_jpeg_is_libjpeg_and_its_surrogate_is_close_and_has_gradients():
    x = _smooth_rgb()
    pil = []
    for im in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=60)
        pil.append(np.array(Image.open(buf)))
    assert torch.equal((real_jpeg(x, 60) * 255).round().byte(), torch.tensor(np.stack(pil)).permute(0, 3, 1, 2))
    assert torch.equal(quantization_table(_LUMA, 50), torch.tensor(_LUMA, dtype=torch.float32).view(8, 8))
    changed = (real_jpeg(x, 60) - x).abs().mean()
    gap = (differentiable_jpeg(x, 60) - real_jpeg(x, 60)).abs().mean()
    assert gap < changed / 2 and gap < 2 / 255
    x_req = x.clone().requires_grad_(True)
    differentiable_jpeg(x_req, 60).sum().backward()
    assert x_req.grad.abs().sum() > 0
    gray = x[:, :1]
    assert (differentiable_jpeg(gray, 60) - real_jpeg(gray, 60)).abs().mean() < 2 / 255


@pytest.mark.parametrize("size", [2, 3, 5])
def test_median_is_scipys(size):
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
    assert np.array_equal(median_filter(x, size).numpy(), ref)


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_gaussian_blur_is_scipys(sigma):
    x = torch.rand(2, 1, 12, 10, dtype=torch.float64)
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="reflect")
    assert np.allclose(gaussian_filter(x, sigma).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("name", ["resize-pad", "crop-rescale", "tv-min"])
def test_randomized_transforms_are_reproducible_and_vary(name):
    d = create_defense(name)
    assert d.randomized and d.draws > 1
    x = _smooth_rgb(4)
    a = d.transform(x, torch.Generator().manual_seed(1))
    b = d.transform(x, torch.Generator().manual_seed(1))
    c = d.transform(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_resize_pad_shrinks_onto_a_black_canvas_and_crop_rescale_zooms():
    x = torch.ones(16, 1, 30, 30)
    out = create_defense("resize-pad", max_scale=1.5).transform(x, torch.Generator().manual_seed(0))
    covered = out.flatten(1).mean(1)  # the image's share of the canvas: (1/scale)^2 for scale in [1, 1.5]
    assert covered.min() > (1 / 1.5) ** 2 - 0.05 and covered.max() <= 1 and covered.std() > 0.01
    ramp = torch.linspace(0, 1, 30).view(1, 1, 1, 30).expand(4, 1, 30, 30).contiguous()
    zoomed = create_defense("crop-rescale", crop=0.5).transform(ramp, torch.Generator().manual_seed(0))
    spread = zoomed[..., -1] - zoomed[..., 0]  # a crop of half the width spans half the ramp
    assert torch.allclose(spread, torch.full_like(spread, 0.5), atol=0.05)


def test_tv_minimization_lowers_total_variation_and_keeps_kept_pixels():
    x = (_smooth_rgb(2) + 0.1 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    keep = torch.ones_like(x)
    z = total_variation_minimize(x, keep, weight=0.03, steps=40)

    def tv(t):
        return (t[..., 1:, :] - t[..., :-1, :]).abs().sum() + (t[..., 1:] - t[..., :-1]).abs().sum()

    assert tv(z) < 0.8 * tv(x)
    assert (z - x).abs().mean() < 0.1


def test_bad_parameters_are_one_line():
    for name, params, match in [("jpeg", {"quality": 0}, "quality must be in 1..100"),
                                ("median", {"size": 1}, "size must be in 2..9"),
                                ("gaussian-blur", {"sigma": 0}, "sigma must be in"),
                                ("resize-pad", {"max_scale": 1.0}, "max_scale must be in"),
                                ("crop-rescale", {"crop": 1.0}, "crop must be in"),
                                ("tv-min", {"drop": 1.0}, "drop must be in")]:
        with pytest.raises(RobustlabError, match=match):
            create_defense(name, **params)
    with pytest.raises(RobustlabError, match="grayscale or RGB"):
        real_jpeg(torch.rand(1, 2, 8, 8), 75)


def test_bpda_with_the_differentiable_jpeg_breaks_what_the_identity_surrogate_leaves(digits_model, digits_test):
    """On the digits model behind JPEG at quality 30: PGD through BPDA with the differentiable JPEG
    leaves no more points robust than with the identity surrogate, and both far fewer than the clean
    accuracy (the defense is broken by the adaptive attack)."""
    x, y = digits_test.x[:96], digits_test.y[:96]
    defended = apply_defenses(digits_model, ["jpeg:quality=30"])
    threat = ThreatModel("linf", 0.15)
    clean = (predict(defended, x) == y).float().mean()
    attack = create_attack("pgd", threat, steps=20)
    adv = attack.run(defended, x, y, torch.Generator().manual_seed(0)).x_adv
    robust = (predict(defended, adv) == y).float().mean()
    identity = apply_defenses(digits_model, ["jpeg:quality=30"])
    identity.defenses[0].surrogate = lambda t: t
    adv_id = attack.run(identity, x, y, torch.Generator().manual_seed(0)).x_adv
    robust_id = (predict(defended, adv_id) == y).float().mean()
    assert clean > 0.85
    assert robust < 0.5 * clean
    assert robust <= robust_id + 0.03


def test_thermometer_encodes_levels_and_its_relaxation_agrees_on_the_grid():
    t = create_defense("thermometer", levels=4)
    x = torch.tensor([0.0, 0.2, 0.26, 0.5, 0.99, 1.0]).view(1, 1, 1, 6)
    code = t.transform(x)[0, :, 0]
    assert code.shape == (4, 6) and t.output_channels(3) == 12
    assert code.sum(0).tolist() == [0, 1, 2, 2, 4, 4]  # how many of the thresholds 0, 1/4, 2/4, 3/4 each exceeds
    grid = torch.arange(9, dtype=torch.float32).view(1, 1, 1, 9) / 8
    assert torch.equal(t.surrogate(grid[..., ::2]), t.transform(grid[..., ::2]))  # equal at multiples of 1/4


def test_defended_model_moves_between_devices():
    """nn.Module.to() runs Module._apply: a defended model must not shadow it."""
    from robustlab.models import create_model

    defended = apply_defenses(create_model("digits_cnn", num_classes=10), ["jpeg"]).to("cpu").float()
    assert defended(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_train_behind_thermometer_then_eval_applies_it_adaptively(tmp_path):
    """`train --defense thermometer` builds the architecture for the encoded channels and records the
    defense in the card; `eval` applies it from the card, attacks through the relaxation (BPDA), and
    flags the non-adaptive attacker's zero gradients. No transfer task: the base model takes codes."""
    import json

    from robustlab.cli import main
    from robustlab.eval import ResultsStore

    ckpt = tmp_path / "th.safetensors"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--n", "600", "--epochs", "3",
                 "--defense", "thermometer:levels=8", "--out", str(ckpt)]) == 0
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["source"] == "defended" and card["in_channels"] == 8
    assert card["defense"] == [{"name": "thermometer", "params": {"levels": 8}}]
    db = tmp_path / "r.db"
    assert main(["eval", "--model", str(ckpt), "--data", "digits", "--n", "60", "--norm", "linf", "--eps", "0.1",
                 "--attack", "pgd:steps=5", "--no-sanity", "--db", str(db), "--json"]) == 0
    with ResultsStore(db) as store:
        (run,) = store.list_runs()
        tasks = {t["task"] for t in store.get_run(run["run_id"])["tasks"]}
    assert "non-adaptive" in tasks and "transfer" not in tasks


def test_mixup_inference_mixes_with_the_reference_set_and_needs_one(digits_model, digits_test):
    from robustlab.data import load_dataset

    with pytest.raises(RobustlabError, match="needs its reference set"):
        create_defense("mixup-inference")
    with pytest.raises(RobustlabError, match="lam must be in"):
        create_defense("mixup-inference", reference="digits:train", lam=1.0)
    mi = create_defense("mixup-inference", reference="digits:train", reference_n=50, lam=0.6, draws=8)
    x = digits_test.x[:16]
    out = mi.transform(x, torch.Generator().manual_seed(0))
    ref = load_dataset("digits", "train").x[:50]
    rest = (out - 0.6 * x) / 0.4  # what was mixed in: one reference image per input
    assert all(((ref - r).abs().flatten(1).max(1).values < 1e-5).any() for r in rest)
    assert torch.equal(out, mi.transform(x, torch.Generator().manual_seed(0)))
    with pytest.raises(RobustlabError, match="reference images are"):
        mi.transform(torch.rand(2, 3, 8, 8))
    defended = apply_defenses(digits_model, [mi.config()])
    assert defended.randomized and defended.needs().eot == 8


def test_mixup_recipe_trains_on_mixed_pairs():
    from robustlab.training import create_objective

    objective = create_objective("mixup", None, alpha=0.4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    loss, logs = objective(model.train(), x, y, torch.Generator().manual_seed(0))
    assert loss.requires_grad and 0 <= float(logs["clean_acc"]) <= 1
    with pytest.raises(RobustlabError, match="alpha must be > 0"):
        create_objective("mixup", None, alpha=0)


def test_quilting_builds_images_from_library_patches():
    import torch.nn.functional as F

    from robustlab.data import load_dataset

    with pytest.raises(RobustlabError, match="needs its patch library"):
        create_defense("quilting")
    q = create_defense("quilting", library="digits:train", library_patches=3000, patch=2, neighbors=5)
    x = load_dataset("digits", "test").x[:8]
    out = q.transform(x, torch.Generator().manual_seed(0))
    patches = F.unfold(out, 2, stride=2).transpose(1, 2).reshape(-1, 4)
    assert (torch.cdist(patches, q._patches).min(dim=1).values < 1e-6).all()  # every piece is a library patch
    assert (out - x).abs().mean() < 0.1  # and a near one
    assert torch.equal(out, q.transform(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, q.transform(x, torch.Generator().manual_seed(1)))
    with pytest.raises(RobustlabError, match="3-channel|1-channel"):
        q.transform(torch.rand(1, 3, 8, 8))


def test_quilting_searches_neighbours_once_per_batch_across_draws(monkeypatch):
    from robustlab.data import load_dataset

    q = create_defense("quilting", library="digits:train", library_patches=2000, patch=2, neighbors=5)
    x = load_dataset("digits", "test").x[:6]
    expected = [q.transform(x, torch.Generator().manual_seed(s)) for s in range(3)]
    q._last = None
    calls = []
    real = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda *a, **k: calls.append(1) or real(*a, **k))
    fresh = create_defense("quilting", library="digits:train", library_patches=2000, patch=2, neighbors=5)
    for s in range(3):  # three draws on one batch (EOT, a vote): one search, the same outputs as before
        assert torch.equal(fresh.transform(x, torch.Generator().manual_seed(s)), expected[s])
    assert len(calls) == 1
    other = x.clone()
    other[0, 0, 0, 0] += 0.5  # another batch is searched again
    fresh.transform(other, torch.Generator().manual_seed(0))
    assert len(calls) == 2
