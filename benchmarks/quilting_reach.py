"""Why MNIST image quilting stays above the undefended model at Linf 0.3, measured, and a quilting-aware
attack: the MNIST quilting row of ``defenses_trained.py`` (mnist_std behind its quilting library).

    python benchmarks/quilting_reach.py [--n 100] [--steps 100]

1. Reach. Quilting replaces each 4x4 patch by one of its ``neighbors`` nearest library patches, so an
   attacker can change the output only where, inside the ball (Linf eps, clipped to [0, 1]), some library
   patch can overtake one the clean patch is nearest to. Library patch j beats i at x exactly when
   ``x . (l_j - l_i) > (|l_j|^2 - |l_i|^2) / 2``, a half-space, and the ball is a box, so "can j beat i
   anywhere in the ball" is exact: the box's maximum of the linear form. Reported: the fraction of
   patches whose nearest library patch can change, and whose neighbour set can change at all.
2. Brightness in reach: over the candidate inputs ``quilting-search`` builds per position (the patch, its
   box's corners, the 64 library patches nearest the box projected onto it), the brightest pixel of any
   of their neighbours, on the positions that are black in the clean image: what an attacker can make the
   network see where the digit has no stroke (a search over candidates, not an exhaustive bound). For
   comparison, the pixels whose bit 1-bit bit-depth reduction lets an attacker flip (exact).
3. Soft-quilting attack (BPDA with a differentiable surrogate): each patch replaced by the
   softmax(-|x_p - l_j|^2 / T)-weighted mean of the library patches, the classifier behind it; APGD
   (CE, DLR) on that surrogate, judged by the real defended model's vote (fixed generator). The
   surrogate's gradient knows which library patches are within reach, where the identity (the row's
   BPDA) does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_confirm_trained import stored_worst_case  # noqa: E402
from common import RESULTS, environment, get_model, load_split, log, set_threads, shared_data_dir  # noqa: E402
from defenses_trained import SETTINGS  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.attacks.quilting_search import candidate_inputs  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.predictor import predict  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def patches_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, P, C*k*k) non-overlapping k x k patches (MNIST 28 = 7 x 4: no padding needed)."""
    return F.unfold(x, k, stride=k).transpose(1, 2)


def reach(flat: torch.Tensor, library: torch.Tensor, eps: float, neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch (rows of ``flat``): can its nearest library patch change inside the ball; can its set of
    ``neighbors`` nearest change (some outside patch overtake one inside)."""
    lo, hi = (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)
    sq = (library ** 2).sum(1)
    near = torch.cdist(flat, library).topk(neighbors, dim=1, largest=False).indices  # P, K
    nearest_can, set_can = torch.zeros(len(flat), dtype=torch.bool), torch.zeros(len(flat), dtype=torch.bool)
    for s in range(0, len(flat), 32):
        lo_c, hi_c, nb = lo[s:s + 32], hi[s:s + 32], near[s:s + 32]
        d = library.unsqueeze(0).unsqueeze(2) - library[nb].unsqueeze(1)  # c, L, K, D
        best = torch.where(d > 0, d * hi_c[:, None, None, :], d * lo_c[:, None, None, :]).sum(-1)  # max of x.d over box
        need = (sq.view(1, -1, 1) - sq[nb].unsqueeze(1)) / 2
        beats = best > need + 1e-6  # c, L, K: library patch j can beat neighbour i
        nearest_can[s:s + 32] = beats[:, :, 0].any(1)
        outside = torch.ones(len(nb), library.shape[0], dtype=torch.bool)
        outside[torch.arange(len(nb)).unsqueeze(1), nb] = False
        set_can[s:s + 32] = (beats.any(2) & outside).any(1)
    return nearest_can, set_can


class SoftQuilt(nn.Module):
    """The classifier behind a soft quilting: each patch the softmax(-d^2 / T)-weighted library mean.
    With ``straight_through`` (a quilting defense), the forward pass is the real quilting (one random
    draw per call) and only the backward pass is the soft one's."""

    def __init__(self, net: nn.Module, library: torch.Tensor, k: int, temperature: float, straight_through=None) -> None:
        super().__init__()
        self.net, self.library, self.k, self.t, self.real = net, library, k, temperature, straight_through
        self.g = torch.Generator().manual_seed(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = patches_of(x, self.k)
        d2 = torch.cdist(cols.reshape(-1, cols.shape[-1]), self.library) ** 2
        soft = torch.softmax(-d2 / self.t, dim=1) @ self.library
        out = F.fold(soft.view(n, -1, soft.shape[-1]).transpose(1, 2), (h, w), self.k, stride=self.k)
        if self.real is not None:
            out = out + (self.real.transform(x.detach(), self.g) - out).detach()
        return self.net(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--temperatures", default="0.02,0.1,0.5")
    args = p.parse_args()
    set_threads(1)
    os.environ.setdefault("ROBUSTLAB_DATA", str(shared_data_dir()))
    _, eps, rows = SETTINGS["mnist"]
    label, model_key, specs = next(r for r in rows if r[0] == "quilting")
    model, _ = get_model(model_key)
    defended = apply_defenses(model, specs).eval()
    quilt = defended.defenses[0]
    library, k, neighbors = quilt._build(), quilt.params["patch"], quilt.params["neighbors"]
    x, y = load_split("mnist", "test")
    x, y = x[:args.n], y[:args.n]
    threat = ThreatModel("linf", eps)

    c0 = time.process_time()
    flat = patches_of(x, k).reshape(-1, k * k)
    nearest_can, set_can = reach(flat, library, eps, neighbors)
    per_image = set_can.view(args.n, -1).float().sum(1)
    blank = flat.amax(1) == 0
    lines = [f"# Image quilting on MNIST at Linf {eps:g}: reach of the attacker, and a soft-quilting attack", "",
             environment(), "", f"Defense: {specs[0]} on {model_key}; first {args.n} MNIST test images, "
             f"{len(flat)} patches ({flat.shape[0] // args.n} per image), library of {len(library)} patches.", "",
             "## Reach (exact: half-space against box, per patch)", "",
             f"- patches whose nearest library patch can change inside the ball: {100 * nearest_can.float().mean():.1f}%",
             f"- patches whose set of {neighbors} nearest can change at all: {100 * set_can.float().mean():.1f}% "
             f"(all-black patches: {100 * blank.float().mean():.1f}% of patches, of which "
             f"{100 * set_can[blank].float().mean():.1f}% can change; the others: {100 * set_can[~blank].float().mean():.1f}%)",
             f"- per image, patches whose neighbour set can change: mean {per_image.mean():.1f} of {flat.shape[0] // args.n}, "
             f"min {per_image.min():.0f}, max {per_image.max():.0f}",
             f"- CPU seconds: {time.process_time() - c0:.0f}", ""]
    log("\n".join(lines[-6:]))

    c0 = time.process_time()
    with torch.no_grad():
        _, near = candidate_inputs(quilt, library, x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), 64)
    brightest = library[near].amax(-1).flatten(2).amax(-1).flatten()  # per position, over candidates and neighbours
    black = patches_of(x, k).reshape(-1, k * k).amax(1) == 0
    lines += [f"## Brightness in reach on black positions (over {near.shape[2]} candidate inputs per position)", ""]
    lines += [f"- black positions where some candidate's neighbour has a pixel >= {t:g}: "
              f"{100 * (brightest[black] >= t).float().mean():.1f}%" for t in (0.3, 0.5, 0.7, 0.9)]
    lines += [f"- CPU seconds: {time.process_time() - c0:.0f}", ""]
    flippable = ((x > 0.5 - eps) & (x < 0.5 + eps)).flatten(1).sum(1).float()
    lines += ["For comparison, 1-bit bit-depth reduction (rounding at 0.5; its MNIST row keeps 80.5%): a pixel's bit "
              f"can flip inside the ball only if its clean value is in ({0.5 - eps:g}, {0.5 + eps:g}): "
              f"{100 * flippable.sum() / x[0].numel() / len(x):.1f}% of pixels, per image mean {flippable.mean():.1f} of "
              f"{x[0].numel()} (min {flippable.min():.0f}, max {flippable.max():.0f}): MNIST's anti-aliased stroke edges.", ""]
    log("\n".join(lines[-9:]))

    with torch.no_grad():
        keep = predict(defended, x, torch.Generator().manual_seed(999)) == y
    stored = stored_worst_case("mnist", f"{model_key}+{label}", args.n)
    lines += ["## Soft-quilting attack (APGD on the surrogate, judged by the defended model's vote)", "",
              f"clean (vote) {100 * keep.float().mean():.1f}%; the row's stored worst case "
              f"{'n/a' if stored is None else f'{100 * (keep & stored).float().mean():.1f}%'}", "",
              "| attack | robust accuracy, this attack alone | cumulative with the attacks above | "
              "with the row's stored worst case | CPU seconds |", "| --- | --- | --- | --- | --- |"]
    total = keep.clone()
    stages = [(t, None, name) for t in [float(v) for v in args.temperatures.split(",")] for name in ("apgd-ce", "apgd-dlr")]
    stages += [(t, quilt, "apgd-dlr") for t in (0.02, 0.1)]
    for t, real, name in stages:
        surrogate = SoftQuilt(model, library, k, t, real).eval()
        c0 = time.process_time()
        x_adv = create_attack(name, threat, steps=args.steps).run(surrogate, x, y, torch.Generator().manual_seed(1)).x_adv
        seconds = time.process_time() - c0
        inside = ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6) & (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
        with torch.no_grad():
            robust = (predict(defended, x_adv, torch.Generator().manual_seed(999)) == y) | ~inside
        robust &= keep
        total &= robust
        both = '' if stored is None else f"{100 * (total & stored).float().mean():.1f}%"
        lines.append(f"| {name.upper()} {args.steps} steps, {'real quilting forward, soft backward' if real else 'soft quilting'} T={t:g} | {100 * robust.float().mean():.1f}% | "
                     f"{100 * total.float().mean():.1f}% | {both} | {seconds:.0f} |")
        log(lines[-1])
        (RESULTS / "quilting_reach.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
