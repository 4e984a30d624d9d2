"""Subnormal weights: what reading them as zero changes (nothing in the logits) and saves (CPU time).

Weight decay drives the weights of units that stop learning towards zero through the subnormal range
(below 1.2e-38 in float32), where they stay: the robust MNIST SmallCNNs of the model zoo, trained
for 60 epochs, hold 6,749 (TRADES) and 12,998 (PGD-AT) of them, mostly in the first fully connected
layer. CPUs compute with subnormal operands many times slower. Evaluations (and attacks called in
``robustlab.models.runtime.fast_runtime``) therefore run with those weights read as zero
(``robustlab.models.runtime.subnormal_weights_zeroed``); this measures
both halves of that claim, side by side in one run:

- the logits with and without the zeroing, on test images and on images with +-eps sign noise
  (bit-identical is the claim);
- process CPU time of a forward pass, of a forward + backward to the input, and of a Square attack
  run through ``Attack.run`` in ``fast_runtime`` with the zeroing on and off (``ZERO_SUBNORMALS``),
  interleaved, medians;
  the Square points must be bit-identical too.

The benchmark models are trained too briefly to hold subnormal weights. Give a model that does with
``--model`` (a checkpoint path, or ``zoo:NAME``); without it, the ``--inject`` K smallest fully
connected weights of ``mnist_pgd`` are replaced by subnormal numbers of the same sign (default K =
6,749, the TRADES zoo model's count). Scattered so, they cost less than where training leaves them:
the TRADES model holds 6,165 of its 6,749 in 61 of the 200 units of its first fully connected
layer. How much subnormals cost at all depends on the CPU.

Measured on the development machine (1 thread, 225 images, medians of 5, both evaluations of issue
#4 running on the other core): with the subnormal weights zeroed, the TRADES zoo model (``--model
zoo:mnist-smallcnn-trades``) ran forwards 1.19x, forward + backward 1.05x and Square (100 queries)
1.33x faster; the injected ``mnist_pgd`` 1.11x, 0.97x and 1.22x. Logits and Square's points were
bit-identical in both. The zeroing itself (scan and copy) costs about 2 ms per call on SmallCNN.

Usage: python benchmarks/subnormal_weights.py [--model SPEC | --inject 6749] [--n 225]
       [--queries 100] [--repeats 5]
The report is printed and written to benchmarks/results/subnormal_weights.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, get_model, load_split, log, robustlab_runtime, set_threads, time_interleaved, write_report  # noqa: E402
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.models import runtime  # noqa: E402
from robustlab.models.loading import load_model  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def inject_subnormals(model: nn.Module, k: int, seed: int = 0) -> None:
    """Replace the ``k`` smallest-magnitude weights of the model's Linear layers by subnormal numbers
    of the same sign (magnitudes spread over the subnormal range), in place."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    flat = torch.cat([w.detach().flatten() for w in weights])
    if not 0 < k <= flat.numel():
        sys.exit(f"--inject must be in 1..{flat.numel()} (the model's fully connected weights)")
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.abs().argsort()[:k]] = True
    gen = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        start = 0
        for w in weights:
            n = w.numel()
            mask = chosen[start:start + n].view_as(w)
            sign = torch.where(w < 0, -1.0, 1.0)
            magnitude = tiny * torch.rand(w.shape, generator=gen).clamp_min(1e-3)
            w.copy_(torch.where(mask, sign * magnitude, w))
            start += n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model: checkpoint path or zoo:NAME; default: mnist_pgd with --inject")
    parser.add_argument("--inject", type=int, default=6749, help="subnormal weights put into mnist_pgd (without --model)")
    parser.add_argument("--n", type=int, default=225, help="first N test images")
    parser.add_argument("--queries", type=int, default=100, help="Square's query budget")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "subnormal_weights.txt")
    args = parser.parse_args()
    set_threads(1)
    if args.model:
        loaded = load_model(args.model)
        model, what = loaded.model, args.model
        dataset = ((loaded.card.dataset if loaded.card else "") or "mnist").split(":")[0]  # e.g. "mnist:train[59500]"
    else:
        model, _ = get_model("mnist_pgd")
        inject_subnormals(model, args.inject)
        dataset, what = "mnist", f"mnist_pgd with its {args.inject} smallest fully connected weights made subnormal"
    model.eval()
    tensors = [*model.parameters(), *model.buffers()]
    count = sum(int(runtime.subnormals(t).sum()) for t in tensors if t.is_floating_point())
    if not count:
        sys.exit(f"{what} holds no subnormal weights: nothing to measure")
    x, y = load_split(dataset, "test")
    x, y = x[: args.n], y[: args.n]
    threat = ThreatModel("linf", args.eps)
    noisy = (x + args.eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)

    def forward(images: torch.Tensor, zero: bool) -> torch.Tensor:
        with runtime.subnormal_weights_zeroed(model, enabled=zero), torch.no_grad():
            return model(images)

    def gradient(zero: bool) -> torch.Tensor:
        with runtime.subnormal_weights_zeroed(model, enabled=zero):
            xi = x.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xi), y)
            return torch.autograd.grad(loss, xi)[0]

    def square(zero: bool):  # through Attack.run in fast_runtime, which follows runtime.ZERO_SUBNORMALS
        saved, runtime.ZERO_SUBNORMALS = runtime.ZERO_SUBNORMALS, zero
        try:
            with robustlab_runtime(model, x):
                return create_attack("square", threat, queries=args.queries).run(model, x, y, torch.Generator().manual_seed(0))
        finally:
            runtime.ZERO_SUBNORMALS = saved

    same_logits = {name: torch.equal(forward(images, True), forward(images, False))
                   for name, images in (("test images", x), ("sign noise", noisy))}
    same_square = torch.equal(square(True).x_adv, square(False).x_adv)
    log(f"subnormal weights: {count}; logits identical: {same_logits}; Square points identical: {same_square}")
    contenders = {}
    for zero in (False, True):
        contenders[("forward", zero)] = lambda z=zero: [forward(noisy, z) for _ in range(10)]
        contenders[("forward+backward", zero)] = lambda z=zero: [gradient(z) for _ in range(5)]
        contenders[(f"Square {args.queries} queries", zero)] = lambda z=zero: square(z)
    times = time_interleaved(contenders, args.repeats, warmup=True)

    lines = [f"# Subnormal weights read as zero ({environment()})", "",
             f"Model: {what}; {count} subnormal weights. First {args.n} {dataset} test images, Linf eps {args.eps}.", "",
             "Logits with the subnormal weights zero and as given: "
             + "; ".join(f"{k} {'bit-identical' if v else 'DIFFERENT'}" for k, v in same_logits.items())
             + f". Square's points: {'bit-identical' if same_square else 'DIFFERENT'}.", "",
             "| work | as given (CPU s, median) | zeroed (CPU s, median) | as given / zeroed |", "|---|---|---|---|"]
    for work in ("forward", "forward+backward", f"Square {args.queries} queries"):
        slow, fast = times[(work, False)]["cpu"], times[(work, True)]["cpu"]
        label = {"forward": f"10 forwards of {args.n} noisy images",
                 "forward+backward": f"5 forward+backward of {args.n} images"}.get(work, work)
        lines.append(f"| {label} | {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x |")
    ok = all(same_logits.values()) and same_square
    lines += ["", f"{'PASS' if ok else 'FAIL'}: zeroing subnormal weights leaves logits and attack results unchanged.", ""]
    write_report("\n".join(lines), args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
