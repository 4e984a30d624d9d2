"""Stronger attacks on the MNIST k-WTA row of ``defenses_trained.py`` (mnist_kwta, ratio 0.1, Linf 0.3,
first 100 test images): BPDA through a smooth surrogate of the k-WTA activation, then the sampled-gradient
attack with more draws and a larger sigma on what is left.

    python benchmarks/kwta_bpda.py [--n 100]

The first rows are what the attack ``kwta-bpda`` (robustlab/attacks/kwta_bpda.py) does, which the
``sampled-gradients`` defense now declares. Surrogate (:class:`robustlab.models.kwta.SmoothKWTA`, BPDA,
straight-through): the forward pass is the real k-WTA; the backward pass is that of
``x * sigmoid((x - t) / tau)``, with ``t`` the layer's k-th largest value (held fixed), so activations
just below the threshold, which a small step would make winners, get a gradient, where the real k-WTA
gives them none. ``tau`` is a fraction of the layer's spread (its standard deviation per sample).
Each attack runs on the points every attack above left robust; judged by the real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_confirm_trained import robust_after, stored_worst_case  # noqa: E402
from common import RESULTS, environment, get_model, load_split, log, set_threads, shared_data_dir  # noqa: E402
from defenses_trained import SETTINGS  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.models.kwta import swap_kwta  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402


def with_smooth(model: nn.Module, tau: float) -> nn.Module:
    """A copy of ``model`` with every KWTA layer replaced by SmoothKWTA (same forward values)."""
    import copy

    twin = copy.deepcopy(model)
    swap_kwta(twin, tau)
    return twin.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    set_threads(1)
    os.environ.setdefault("ROBUSTLAB_DATA", str(shared_data_dir()))
    _, eps, rows = SETTINGS["mnist"]
    label, model_key, specs = next(r for r in rows if "k-WTA" in r[0])
    model, _ = get_model(model_key)
    model.eval()
    threat = ThreatModel("linf", eps)
    x, y = load_split("mnist", "test")
    x, y = x[:args.n], y[:args.n]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    lines = [f"# k-WTA 0.1 on MNIST, Linf {eps:g}: BPDA through a smooth k-WTA, then sampled gradients", "",
             environment(), "", f"{model_key}, first {args.n} MNIST test images; clean {100 * keep.float().mean():.1f}%. "
             "Each row attacks the points the rows above left robust; judged by the real k-WTA model.", "",
             "| attack | robust accuracy (worst case so far) | CPU seconds |", "| --- | --- | --- |"]

    def record(what: str, seconds: float) -> None:
        lines.append(f"| {what} | {100 * keep.float().mean():.1f}% | {seconds:.0f} |")
        log(lines[-1])
        (RESULTS / "kwta_bpda.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    stages = []
    for tau in (0.1, 0.5):
        for name in ("apgd-ce", "apgd-dlr"):
            stages.append((f"{name.upper()} 100 steps, BPDA smooth k-WTA tau={tau:g}", with_smooth(model, tau),
                           create_attack(name, threat, steps=100)))
    stages.append(("APGD-DLR 100 steps x 3 restarts, BPDA smooth k-WTA tau=0.5", with_smooth(model, 0.5),
                   create_attack("apgd-dlr", threat, steps=100, restarts=3)))
    for i, (what, surrogate, attack) in enumerate(stages):
        keep, seconds = bpda_after(surrogate, model, attack, x, y, keep, threat, seed=i)
        record(what, seconds)
    stored = stored_worst_case("mnist", f"{model_key}+{label}", args.n)
    if stored is not None:
        keep &= stored
        record("with the row's stored worst case (its non-adaptive, transfer and adaptive tasks)", 0)
    for sigma, draws in ((0.2, 128), (0.3, 128)):
        defended = apply_defenses(model, [f"sampled-gradients:sigma={sigma},draws={draws}"]).eval()
        keep, seconds = robust_after(defended, create_attack("apgd-dlr", threat, steps=100, eot=draws),
                                     x, y, keep, threat, seed=10 + draws)
        record(f"APGD-DLR 100 steps, sampled gradients sigma={sigma:g} over {draws} draws", seconds)
    print("\n".join(lines))


def bpda_after(surrogate, model, attack, x, y, keep, threat, seed):
    """``keep`` less the points whose attack on ``surrogate`` (same forward as ``model``) fools ``model``."""
    idx = keep.nonzero(as_tuple=True)[0]
    out = keep.clone()
    if idx.numel() == 0:
        return out, 0.0
    c0 = time.process_time()
    x_adv = attack.run(surrogate, x[idx], y[idx], torch.Generator().manual_seed(seed)).x_adv
    seconds = time.process_time() - c0
    inside = ((x_adv - x[idx]).abs().flatten(1).amax(1) <= threat.eps + 1e-6) & (x_adv >= 0).flatten(1).all(1) \
        & (x_adv <= 1).flatten(1).all(1)
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y[idx]
    out[idx[wrong & inside]] = False
    return out, seconds


if __name__ == "__main__":
    main()
