"""Every input-transformation defense on a standard MNIST and CIFAR-10 model: clean accuracy, the
non-adaptive robust accuracy (attacks run on the defended model as if it were plain, and transferred
from the undefended model), the adaptive one (BPDA with each defense's surrogate, EOT over its draws)
and the undefended model's, in one table; plus each defense's forward-time overhead.

The published outcome (Athalye et al. 2018; Tramer et al. 2020): these defenses add little or nothing
against an adaptive attack. The table's last column checks the issue's bar: adaptive robust accuracy
at most 5 points above the undefended model's under the same attack.

    python benchmarks/defenses_adaptive.py [--n 200] [--only mnist|cifar10]

Models: benchmarks/common.py's reference models (trained on first use). Attack: APGD-CE (100 steps),
Linf 0.3 (MNIST) and 8/255 (CIFAR-10), one evaluation per defense through robustlab's runner, which
runs the adaptive and the non-adaptive attacks and reports the per-sample worst case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, write_report  # noqa: E402

from robustlab.attacks import create_attack  # noqa: E402
from robustlab.data import ImageDataset  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.eval import EvalOptions, ResultsStore, evaluate  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

SETTINGS = {
    "mnist": ("mnist_std", 0.3, ["jpeg:quality=75", "bit-depth:bits=1", "median:size=3", "gaussian-blur:sigma=1",
                                 "resize-pad", "crop-rescale", "tv-min", "noise:sigma=0.3"]),
    "cifar10": ("cifar_std", 8 / 255, ["jpeg:quality=75", "bit-depth:bits=5", "median:size=2", "gaussian-blur:sigma=0.5",
                                       "resize-pad", "crop-rescale", "tv-min", "noise:sigma=0.05"]),
}


def overhead(model, defended, x: torch.Tensor, repeats: int = 5, bare_input: torch.Tensor | None = None) -> float:
    """Forward time of the defended prediction over the bare model's, on the same batch (the bare model
    on ``bare_input`` where it takes another input: the encoded batch behind an encoding)."""
    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        bare = best(lambda: model(x if bare_input is None else bare_input))
        ours = best(lambda: defended.predict(x, torch.Generator().manual_seed(0)))
    return ours / bare


def run(dataset: str, n: int, db: Path) -> list[str]:
    key, eps, defenses = SETTINGS[dataset]
    model, _ = get_model(key)
    x, y = load_split(dataset, "test")
    data = ImageDataset(dataset, "test", x[:n], y[:n], [str(i) for i in range(10)])
    threat = ThreatModel("linf", eps)
    attack = create_attack("apgd-ce", threat, steps=100)
    options = EvalOptions(steps_grid=(), sanity=True, batch_size=100, seed=0)
    rows = []
    with ResultsStore(db) as store:
        base = evaluate(model, data, [attack], store, model_name=key, progress=False).summary
        log(f"[{dataset}] undefended: clean {base['clean_accuracy']:.3f} robust {base['robust_accuracy']:.3f}")
        for spec in defenses:
            t0 = time.perf_counter()
            defended = apply_defenses(model, [spec])
            res = evaluate(defended, data, [attack], store, model_name=f"{key}+{spec}", options=options, progress=False)
            s, checks = res.summary, {c["name"]: c["status"] for c in res.checks}
            naive = s["non_adaptive"]
            ratio = overhead(model, defended, x[:100])
            margin = s["robust_accuracy"] - base["robust_accuracy"]
            rows.append((spec, s["clean_accuracy"], naive["robust_accuracy"], naive.get("transfer_robust_accuracy"),
                         s["ensemble_robust_accuracy"], s["robust_accuracy"], margin, checks.get("adaptive-gap"),
                         checks.get("non-adaptive gradients"), ratio, defended.needs().describe()))
            log(f"[{dataset}] {spec}: {rows[-1][:9]} ({time.perf_counter() - t0:.0f} s)")
    pct = lambda v: "—" if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    out = [f"## {dataset}: {key}, Linf {eps:.4g}, APGD-CE 100 steps, first {n} test images",
           f"undefended: clean {pct(base['clean_accuracy'])}, robust {pct(base['robust_accuracy'])}", "",
           "| defense | clean | non-adaptive | transfer | adaptive | reported (worst case) | vs undefended | within 5 pts | "
           "adaptive-gap check | non-adaptive gradients | forward overhead | adaptive attack |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for spec, clean, na, tr, ad, rep, margin, gap, grads, ratio, how in rows:
        out.append(f"| {spec} | {pct(clean)} | {pct(na)} | {pct(tr)} | {pct(ad)} | {pct(rep)} | {100 * margin:+.1f} | "
                   f"{'yes' if margin <= 0.05 else 'NO'} | {gap} | {grads} | {ratio:.2f}x | {how} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--only", choices=sorted(SETTINGS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    lines = ["# Input-transformation defenses: non-adaptive vs adaptive robust accuracy", "", environment(), ""]
    db = RESULTS.parent / ".cache" / "defenses_adaptive.db"
    db.parent.mkdir(exist_ok=True)
    db.unlink(missing_ok=True)
    for dataset in ([args.only] if args.only else list(SETTINGS)):
        lines += run(dataset, args.n, db) + [""]
    name = "defenses_adaptive" + (f"_{args.only}" if args.only else "")
    write_report("\n".join(lines), RESULTS / f"{name}.txt")


if __name__ == "__main__":
    main()
