"""Randomized smoothing against the reference implementation (locuslab/smoothing, ``code/core.py``,
Cohen et al. 2019), side by side in one process on the same base model, inputs, sigma, n0, n, alpha
and noise batch size.

Claims tested:

1. **Identical when fed the same noise.** Both draw Gaussian noise from a generator seeded the same
   per image (the reference's ``torch.randn_like`` is pointed at that generator): every prediction,
   abstention, count and radius must be identical (CERTIFY and PREDICT).
2. **Same decisions within Monte-Carlo error on independent noise.** Each image's estimation count
   nA differs only by sampling: a two-proportion z-test per image (|z| > 3.29 expected for ~0.1% of
   images); abstentions agree except near the threshold; the mean radius gap is reported.
3. **Speed.** CPU time of certifying K images with robustlab (images batched, noise written in place)
   against the reference (one image at a time, a Python loop over chunks) and against the bare
   forward floor: the base model alone over the same number of noisy images in batches of the same
   size (no noise, no counting). Target: robustlab <= 1.1x the floor, faster than the reference.

How the reference is run: the benchmark reads ``code/core.py`` from a mirror of
github:locuslab/smoothing (``--reference PATH``: the ``.git`` directory of the mirror, or a checkout),
writes it to a temporary folder and imports it unchanged, with three shims for this environment:
``scipy.stats.binom_test`` (removed in SciPy 1.12) is provided as ``binomtest(...).pvalue``; the
reference's ``torch.randn_like(batch, device='cuda')`` draws on the CPU from the benchmark's
generator (claim 1) or the global RNG (claims 2-3); nothing else is touched. It needs statsmodels
(``pip install statsmodels``; it does not change torch). The reference's code is not part of
robustlab and is never committed.

Usage: ``nice python benchmarks/smoothing_vs_reference.py --reference /work/.mirror/locuslab+smoothing/repo/.git``
(``--model PATH`` a robustlab checkpoint, default the cached MNIST sigma=0.25 model of
``smoothing_published.py`` if present, else an untrained cifar_cnn; ``--images K``; ``--n``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_split, set_threads  # noqa: E402

from robustlab.certify import SmoothedClassifier, certificate_from_counts, create_noise, vote_counts  # noqa: E402
from robustlab.predictor import ABSTAIN  # noqa: E402


def load_reference(path: Path):
    """core.py of locuslab/smoothing, imported unchanged from a temporary copy (see the docstring)."""
    if (path / "HEAD").is_file() and not (path / "code").exists():  # a bare mirror: read the file from git
        text = subprocess.run(["git", f"--git-dir={path}", "show", "HEAD:code/core.py"], check=True,
                              capture_output=True, text=True).stdout
    else:
        text = (path / "code" / "core.py").read_text()
    import scipy.stats
    from scipy.stats import binomtest

    if not hasattr(scipy.stats, "binom_test"):
        scipy.stats.binom_test = lambda k, n, p=0.5: binomtest(int(k), int(n), p).pvalue
    folder = Path(tempfile.mkdtemp(prefix="smoothing_reference_"))
    (folder / "reference_core.py").write_text(text)
    spec = importlib.util.spec_from_file_location("reference_core", folder / "reference_core.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TorchOnCPU(types.ModuleType):
    """``torch`` for the reference module, with ``randn_like(..., device='cuda')`` drawing on the
    CPU from ``generator`` (None: the global RNG)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.generator: torch.Generator | None = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, t, device=None, **kwargs):
        return torch.randn(t.shape, generator=self.generator, dtype=t.dtype)


def load_model(spec: str | None):
    from robustlab.models import create_model, load_checkpoint

    default = Path(__file__).resolve().parent / ".cache" / "smooth_mnist_0.25.safetensors"
    if spec is None and default.is_file():
        spec = str(default)
    if spec is None:
        return create_model("cifar_cnn", num_classes=10).eval(), "cifar10", "untrained cifar_cnn"
    model, card = load_checkpoint(spec)
    dataset = "mnist" if card.in_channels == 1 else "cifar10"
    return model.eval(), dataset, spec


def default_cost(spec: str, k: int) -> list[str]:
    """4. CPU time of a certified run at the command's defaults (n0 100, n 1000, alpha 0.001, noise batch
    400, attack check on the first 100 images: 20 PGD steps x 8 draws and PREDICT with n draws, twice
    at most) on k CIFAR-10 images with and k without the attack check; a 500-image run is 100 images
    with it and 400 without."""
    import tempfile as tmp

    from robustlab.data import load_dataset
    from robustlab.eval.protocols import CertifiedOptions
    from robustlab.eval.runner import certify
    from robustlab.eval.store import ResultsStore
    from robustlab.models import load_checkpoint

    from common import shared_data_dir

    model, _ = load_checkpoint(spec)
    data = load_dataset("cifar10", "test", root=shared_data_dir()).subset(k)
    per = {}
    for attack_n in (0, k):
        with tmp.TemporaryDirectory() as folder, ResultsStore(Path(folder) / "t.db") as store:
            t = time.process_time()
            certify(model, data, CertifiedOptions(attack_n=attack_n), store, progress=False)
            per[attack_n] = (time.process_time() - t) / k
    total = 100 * per[k] + 400 * per[0]
    return [f"4. `robustlab certify` defaults (n0 100, n 1000, alpha 0.001) on CIFAR-10 with {spec}: "
            f"{per[0]:.2f} s CPU per image without the attack check, {per[k]:.2f} s with it (measured on {k} images "
            "each, one thread)",
            f"   a 500-image certification (attack check on the first 100): {total:.0f} s CPU = {total / 60:.1f} min "
            f"(extrapolated from the per-image figures)"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="/work/.mirror/locuslab+smoothing/repo/.git")
    ap.add_argument("--model")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--speed-images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cifar-model", help="a CIFAR-10 checkpoint: time `robustlab certify` at its defaults (claim 4)")
    ap.add_argument("--cifar-images", type=int, default=8)
    ap.add_argument("--only-cost", action="store_true",
                    help="run claim 4 alone (needs --cifar-model), into results/smoothing_default_cost.txt")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.only_cost:
        text = "\n".join([f"# robustlab certify at its defaults on CIFAR-10 ({environment()})",
                          *default_cost(args.cifar_model, args.cifar_images)]) + "\n"
        print(text)
        (RESULTS / "smoothing_default_cost.txt").write_text(text)
        return
    ref = load_reference(Path(args.reference))
    shim = TorchOnCPU()
    ref.torch = shim
    model, dataset, name = load_model(args.model)
    x_all, _ = load_split(dataset, "test")
    x = x_all[: args.images]
    k = args.images
    noise = create_noise("gaussian", sigma=args.sigma)
    ours = SmoothedClassifier(model, noise, 10, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch)
    theirs = ref.Smooth(model, 10, args.sigma)
    lines = [f"# randomized smoothing vs locuslab/smoothing core.py ({environment()})",
             f"model {name} on {dataset} test images 0..{k - 1}; sigma {args.sigma}, n0 {args.n0}, n {args.n}, "
             f"alpha {args.alpha}, noise batch {args.batch}", ""]

    # 1. the same noise: identical everything
    same = 0
    same_predict = 0
    for i in range(k):
        g_ours = torch.Generator().manual_seed(1000 + i)
        c = ours.certify(x[i:i + 1], [g_ours], [g_ours])  # selection then estimation from one stream, as the reference
        shim.generator = torch.Generator().manual_seed(1000 + i)
        rc, rr = theirs.certify(x[i], args.n0, args.n, args.alpha, args.batch)
        same += int(int(c.prediction[0]) == rc and float(c.radius[0]) == float(rr))
        g_ours = torch.Generator().manual_seed(5000 + i)
        p = int(ours.predict(x[i:i + 1], [g_ours])[0])
        shim.generator = torch.Generator().manual_seed(5000 + i)
        rp = int(theirs.predict(x[i], args.n, args.alpha, args.batch))
        same_predict += int(p == rp)
    lines.append(f"1. same noise: CERTIFY identical (class and radius, bit for bit) on {same}/{k} images; "
                 f"PREDICT identical on {same_predict}/{k}")
    lines.append(f"   {'PASS' if same == k and same_predict == k else 'FAIL'} identical when fed the same noise")
    lines.append("")

    # 2. independent noise: within Monte-Carlo error
    shim.generator = None
    torch.manual_seed(0)
    z_big, abst_ours, abst_ref, disagree, gaps, ours_r, ref_r = 0, 0, 0, 0, [], [], []
    for i in range(k):
        g = torch.Generator().manual_seed(9000 + i)
        sel = vote_counts(model, x[i:i + 1], args.n0, noise, args.batch, [g], 10)
        est = vote_counts(model, x[i:i + 1], args.n, noise, args.batch, [g], 10)
        cert = certificate_from_counts(sel, est, args.n, args.alpha, noise, tuple(x.shape[1:]))
        c_top = int(sel.argmax())
        n_a = int(est[0, c_top])
        # the reference's own steps of certify(), to see its counts: _sample_noise and _lower_confidence_bound
        counts_sel = theirs._sample_noise(x[i], args.n0, args.batch)
        r_top = int(counts_sel.argmax())
        r_counts = theirs._sample_noise(x[i], args.n, args.batch)
        r_a = int(r_counts[r_top])
        p_ref = ref.Smooth._lower_confidence_bound(theirs, r_a, args.n, args.alpha)
        rc, rr = (ref.Smooth.ABSTAIN, 0.0) if p_ref < 0.5 else (r_top, args.sigma * ref.norm.ppf(p_ref))
        oc, orr = int(cert.prediction[0]), float(cert.radius[0])
        if c_top == r_top:
            pooled = (n_a + r_a) / (2 * args.n)
            se = math.sqrt(max(pooled * (1 - pooled) * 2 / args.n, 1e-12))
            z_big += int(abs(n_a - r_a) / args.n / se > 3.29) if 0 < pooled < 1 else 0
        abst_ours += oc == ABSTAIN
        abst_ref += rc == ref.Smooth.ABSTAIN
        disagree += (oc == ABSTAIN) != (rc == ref.Smooth.ABSTAIN)
        gaps.append(abs(orr - rr))
        ours_r.append(orr)
        ref_r.append(rr)
    lines.append(f"2. independent noise: abstained robustlab {abst_ours}/{k}, reference {abst_ref}/{k}; abstention "
                 f"differs on {disagree} image(s)")
    lines.append(f"   mean radius robustlab {np.mean(ours_r):.4f}, reference {np.mean(ref_r):.4f}; mean |radius gap| "
                 f"{np.mean(gaps):.4f}, max {np.max(gaps):.4f}")
    lines.append(f"   estimation counts nA differ beyond |z| > 3.29 (0.1% two-sided) on {z_big}/{k} images")
    ok = z_big <= max(1, round(0.01 * k)) and abs(np.mean(ours_r) - np.mean(ref_r)) < 0.05 * args.sigma + 1e-9
    lines.append(f"   {'PASS' if ok else 'FAIL'} same decisions within Monte-Carlo error")
    lines.append("")

    # 3. speed: robustlab (batched), reference (per image), and the bare forward floor, interleaved
    ks = args.speed_images
    xs = x[:ks]
    total = ks * (args.n0 + args.n)
    floor_batch = torch.rand(args.batch, *x.shape[1:])

    def floor():
        with torch.inference_mode():
            left = total
            while left:
                b = min(args.batch, left)
                model(floor_batch[:b]).argmax(dim=1)
                left -= b

    def run_ours():
        gens = [torch.Generator().manual_seed(i) for i in range(ks)]
        ours.certify(xs, gens)

    def run_ref():
        for i in range(ks):
            theirs.certify(xs[i], args.n0, args.n, args.alpha, args.batch)

    times = {"floor": [], "robustlab": [], "reference": []}
    floor()
    for _ in range(3):
        for key, fn in (("floor", floor), ("robustlab", run_ours), ("reference", run_ref)):
            t = time.process_time()
            fn()
            times[key].append(time.process_time() - t)
    med = {key: float(np.median(v)) for key, v in times.items()}
    lines.append(f"3. speed: {ks} images x (n0 + n) = {total} noisy images, process CPU time, median of 3 interleaved "
                 "repeats")
    for key in ("floor", "robustlab", "reference"):
        lines.append(f"   {key:<10} {med[key]:8.2f} s  ({1e3 * med[key] / total:.3f} ms per noisy image)")
    lines.append(f"   robustlab / floor = {med['robustlab'] / med['floor']:.3f}; reference / floor = "
                 f"{med['reference'] / med['floor']:.3f}; robustlab / reference = {med['robustlab'] / med['reference']:.3f}")
    lines.append(f"   {'PASS' if med['robustlab'] <= 1.1 * med['floor'] else 'FAIL'} within 1.1x of the forward floor; "
                 f"{'PASS' if med['robustlab'] < med['reference'] else 'FAIL'} faster than the reference")
    if args.cifar_model:
        lines += ["", *default_cost(args.cifar_model, args.cifar_images)]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smoothing_vs_reference.txt").write_text(text)


if __name__ == "__main__":
    main()
