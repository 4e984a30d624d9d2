"""Corruption fidelity: robustlab's 19 corruptions against the imagecorruptions package.

The claim under test (issue #17): for each corruption imagecorruptions implements (all 19, with the
ImageNet-C constants), on the same images and severities, robustlab's output at its 224 px table
matches the package's within a stated tolerance (mean absolute pixel difference, 0-255 scale) where
the operation is deterministic, and gives the same error rate on a model within 1 point where it is
random.

Part A, pixels (224 px: the first CIFAR-10 test images enlarged bilinearly to 224 x 224):
- deterministic corruptions: both outputs on the same images;
- random ones whose random numbers can be replayed: NumPy's global generator is seeded, the package
  runs, the generator is seeded again and the same numbers are drawn in the package's order, then fed
  to robustlab's corruption (its ``*_core`` function or its draw hook), so both apply the same
  operation to the same noise. Replayed: gaussian and speckle noise, glass blur (every swap),
  motion blur (the angle), snow, fog (the whole plasma fractal), spatter.
Both outputs are compared as the package writes them (``np.uint8(x * 255)``, truncation).

Part B, error rates (32 px CIFAR-10 test images, the model ``cifar_std`` of benchmarks/common.py):
every corruption and severity applied by both tools with the same (ImageNet) constants (robustlab
``table=224``), the model's error on each; independent randomness on each side. The random
corruptions whose numbers cannot be replayed (shot and impulse noise, frost, elastic transform) are
checked here; the table also lists the error under the CIFAR-10-C constants robustlab uses for
32 px images.

Deliberate differences (robustlab follows the published ImageNet-C script, hendrycks/robustness
make_imagenet_c.py; the package changed these):
- elastic_transform: the package replaced the transform (no random affine part, other constants);
  robustlab keeps the published one, so neither pixels nor error rates are expected to agree.
- pixelate: the package enlarges with NEAREST, the published script with BOX (robustlab).
- frost: the package enlarges every texture by 1.1 (bicubic) before cropping; the script crops the
  textures as they are. Same textures (robustlab reads the package's files when it is installed).
- snow: the package streaks the zoomed snow layer before cutting it to the image size, the published
  script cuts (centred) first; at 224 px the layer is at most one pixel larger (zooms 2.5 and 4.5),
  so streaks differ only near the border; at 32 px with the ImageNet constants (part B) it is up to 4
  pixels larger and the package keeps its top-left corner.
- motion blur and snow's streaks: both use the package's kernel form of ImageMagick's motion blur.
- glass blur: both (and the published script) "swap" pixels with a NumPy tuple assignment of views,
  which copies; robustlab reproduces that exactly (the comparison replays every offset).

Usage: python benchmarks/corruptions_fidelity.py [--n-pixels 6] [--n-glass 3] [--n-error 500]
Cost: about 10 minutes of CPU at the defaults (imagecorruptions' glass blur at 224 px dominates).
Install the peer: pip install imagecorruptions 'setuptools<81'. The report is printed and written to
benchmarks/results/corruptions_fidelity.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import corruption_peer
from benchmarks.common import (
    RESULTS,
    environment,
    get_model,
    load_split,
    log,
    set_threads,
)
from robustlab.corruptions import CORRUPTIONS, create_corruption, noise, suite
from robustlab.corruptions.blur import glass_core
from robustlab.corruptions.imaging import motion_blur
from robustlab.corruptions.weather import fog_core, snow_core, spatter_core

DETERMINISTIC_TOL = {  # mean absolute difference, 0-255 scale
    "defocus_blur": 0.5, "zoom_blur": 0.5, "gaussian_blur": 0.5, "brightness": 0.5, "contrast": 0.5,
    "saturate": 0.5, "jpeg_compression": 1.0,
}
REPLAY_TOL = {
    "gaussian_noise": 0.5, "speckle_noise": 0.5, "glass_blur": 0.5, "motion_blur": 0.5, "fog": 0.5,
    "spatter": 1.0,  # exact Euclidean distances where OpenCV uses its 5x5 chamfer approximation
    # the package streaks the zoomed snow layer before cutting it to the image (at zooms 2.5 and 4.5 it
    # is one pixel larger), the published script after: streaks differ near the right/bottom border
    "snow": 1.0,
}
DELIBERATE = {
    "pixelate": "BOX enlargement (published script) vs the package's NEAREST",
    "elastic_transform": "the published transform (random affine + elastic field) vs the package's replacement",
    "frost": "textures cropped at their size (published script) vs enlarged 1.1x by the package",
}
ERROR_TOL = 1.0  # points


@contextlib.contextmanager
def patched(module, attr: str, value):
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def ours_replayed(name: str, img: np.ndarray, severity: int, seed: int) -> torch.Tensor:
    """robustlab's output on the random numbers the package draws after ``np.random.seed(seed)``."""
    x = chw(img)
    c = CORRUPTIONS.get(name).tables[224][severity - 1]
    h, w = img.shape[:2]
    np.random.seed(seed)
    if name in ("gaussian_noise", "speckle_noise"):
        z = torch.from_numpy(np.random.normal(size=img.shape)).permute(2, 0, 1)[None].float()
        with patched(noise, "normal", lambda *a, **k: z):
            return create_corruption(name, severity)(x)
    if name == "glass_blur":
        sigma, d, iterations = c
        offsets = []
        for _ in range(iterations):
            pairs = [np.random.randint(-d, d, size=(2,)) for _ in range(h - d, d, -1) for _ in range(w - d, d, -1)]
            offsets.append(torch.from_numpy(np.stack(pairs))[None])
        return glass_core(x, sigma, d, offsets).clamp(0, 1)
    if name == "motion_blur":
        angle = np.random.uniform(-45, 45)
        return motion_blur(x, c[0], c[1], torch.tensor([angle])).clamp(0, 1)
    if name == "snow":
        z = torch.from_numpy(np.random.normal(size=(h, w))).float()[None, None]
        angle = np.random.uniform(-135, -45)
        return snow_core(x, c, z, torch.tensor([angle])).clamp(0, 1)
    if name == "fog":
        from robustlab.corruptions.imaging import next_power_of_2, plasma_fractal

        def draw(shape):
            return torch.from_numpy(np.random.random_sample(shape[1:]))[None]

        plasma = plasma_fractal(1, next_power_of_2(max(h, w)), c[1], draw, torch.device("cpu"))
        return fog_core(x, c, plasma).clamp(0, 1)
    if name == "spatter":
        z = torch.from_numpy(np.random.normal(size=(h, w))).float()[None, None]
        return spatter_core(x, c, z).clamp(0, 1)
    raise KeyError(name)


def part_a(ic, images: np.ndarray, n_glass: int, seed: int) -> tuple[list[str], list[bool]]:
    lines = ["A. pixels at 224 px (CIFAR-10 test images enlarged bilinearly), both written as np.uint8(x * 255)",
             f"{'corruption':18s} {'how':12s} {'images':>6s} {'MAD s1..s5 (0-255)':>38s} {'mean':>6s} {'tol':>5s}  verdict"]
    verdicts = []
    for name in suite("all-c"):
        if name in DETERMINISTIC_TOL:
            how, tol = "same input", DETERMINISTIC_TOL[name]
        elif name in REPLAY_TOL:
            how, tol = "replayed", REPLAY_TOL[name]
        elif name == "pixelate":
            how, tol = "same input", None
        else:
            continue  # random and not replayable: part B
        n = n_glass if name == "glass_blur" else len(images)
        per_sev = []
        t0 = time.process_time()
        for severity in range(1, 6):
            diffs = []
            for i, img in enumerate(images[:n]):
                s = seed + 1000 * severity + i
                np.random.seed(s)
                peer = ic.corrupt(img, severity=severity, corruption_name=name)
                if how == "replayed":
                    ours = ours_replayed(name, img, severity, s)
                else:
                    ours = create_corruption(name, severity)(chw(img))
                diffs.append(np.abs(corruption_peer.to_peer_uint8(ours)[0].astype(float) - peer.astype(float)).mean())
            per_sev.append(float(np.mean(diffs)))
        mean = float(np.mean(per_sev))
        if tol is None:
            verdict = f"DELIBERATE ({DELIBERATE[name]})"
        else:
            ok = max(per_sev) <= tol
            verdicts.append(ok)
            verdict = "PASS" if ok else "FAIL"
        sev = " ".join(f"{v:6.2f}" for v in per_sev)
        lines.append(f"{name:18s} {how:12s} {n:6d} {sev:>38s} {mean:6.2f} {'' if tol is None else f'{tol:5.1f}':>5s}  {verdict}")
        log(f"[A] {name}: {sev}  ({time.process_time() - t0:.0f} s CPU)")
    return lines, verdicts


def errors(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        wrong = sum(int((model(x[i:i + 250]).argmax(1) != y[i:i + 250]).sum()) for i in range(0, len(y), 250))
    return 100.0 * wrong / len(y)


def part_b(ic, model, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[list[str], list[bool]]:
    images = corruption_peer.to_numpy_images(x)
    clean = errors(model, x, y)
    lines = [(f"B. model error (%) at 32 px: cifar_std on the first {len(y)} CIFAR-10 test images (clean error "
             f"{clean:.1f}%), mean over severities 1-5; both tools with the ImageNet constants"),
             (f"{'corruption':18s} {'imagecorruptions':>16s} {'robustlab 224':>13s} {'diff':>6s} {'tol':>4s}  "
             f"{'robustlab CIFAR-10-C consts':>27s}  verdict")]
    verdicts = []
    np.random.seed(seed)
    for name in suite("all-c"):
        cls = CORRUPTIONS.get(name)
        peer_err, ours_err, cifar_err = [], [], []
        t0 = time.process_time()
        for severity in range(1, 6):
            peer = np.stack([ic.corrupt(img, severity=severity, corruption_name=name) for img in images])
            peer_err.append(errors(model, torch.from_numpy(peer).permute(0, 3, 1, 2).float() / 255.0, y))
            gen = torch.Generator().manual_seed(seed + severity)
            for table, out in ((224, ours_err), (0, cifar_err)):
                c = create_corruption({"name": name, "params": {"severity": severity, "table": table}})
                ours = torch.from_numpy(corruption_peer.to_peer_uint8(c(x, gen))).permute(0, 3, 1, 2).float() / 255.0
                out.append(errors(model, ours, y))
        p, o, cc = float(np.mean(peer_err)), float(np.mean(ours_err)), float(np.mean(cifar_err))
        diff = o - p
        if name in DELIBERATE and name != "frost":
            verdict = f"DELIBERATE ({DELIBERATE[name]})"
        else:
            ok = abs(diff) <= ERROR_TOL
            if cls.randomized:
                verdicts.append(ok)
            verdict = ("PASS" if ok else "FAIL") + ("" if cls.randomized else " (deterministic: see A)")
        lines.append(f"{name:18s} {p:16.1f} {o:13.1f} {diff:+6.1f} {ERROR_TOL:4.1f}  {cc:27.1f}  {verdict}")
        log(f"[B] {name}: peer {p:.1f}  ours {o:.1f}  cifar consts {cc:.1f}  ({time.process_time() - t0:.0f} s CPU)")
    return lines, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-pixels", type=int, default=6, help="images in part A (default 6)")
    parser.add_argument("--n-glass", type=int, default=3, help="images for glass blur in part A (default 3)")
    parser.add_argument("--n-error", type=int, default=500, help="images in part B (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_threads(1)
    ic = corruption_peer.load()
    x_test, y_test = load_split("cifar10", "test")
    big = F.interpolate(x_test[: args.n_pixels], size=(224, 224), mode="bilinear", align_corners=False)
    lines_a, ok_a = part_a(ic, corruption_peer.to_numpy_images(big), args.n_glass, args.seed)
    model, _card = get_model("cifar_std")
    lines_b, ok_b = part_b(ic, model, x_test[: args.n_error], y_test[: args.n_error], args.seed)
    frost_source = create_corruption("frost").params["textures"]
    report = "\n".join([
        "Corruption fidelity: robustlab vs imagecorruptions (issue #17)",
        f"environment: {environment()}; frost textures: {frost_source}",
        "",
        *lines_a,
        "",
        *lines_b,
        "",
        "Deliberate differences: " + "; ".join(f"{k}: {v}" for k, v in DELIBERATE.items()),
        f"{'PASS' if all(ok_a) else 'FAIL'}: {sum(ok_a)}/{len(ok_a)} pixel comparisons within tolerance",
        (f"{'PASS' if all(ok_b) else 'FAIL'}: {sum(ok_b)}/{len(ok_b)} random corruptions within {ERROR_TOL} point of "
        "the package's error rate (elastic_transform and pixelate excluded: deliberate)"),
    ])
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "corruptions_fidelity.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
