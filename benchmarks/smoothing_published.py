"""The shape of published randomized-smoothing results on our data: certified accuracy at radii 0,
0.25, 0.5, 0.75, 1.0 and ACR for base models trained with Gaussian noise (the ``noise`` recipe) at
sigma 0.25 / 0.5 / 1.0 on MNIST and CIFAR-10 (the shared subsets), next to Cohen et al.'s
published CIFAR-10 figures (ResNet-110, n = 100,000: certified accuracy at radius 0 of 0.75 / 0.65 /
0.47 and ACR 0.42 / 0.49 / 0.46 at sigma 0.25 / 0.5 / 1.0; ACRs as tabulated by Zhai et al. 2020).

What "shape" means here: certified accuracy at radius 0 falls as sigma grows; larger sigma
certifies larger radii (its curve falls more slowly); ACR is of the order of sigma/2 and peaks at a
middle sigma on CIFAR-10. Our base models are small and trained for minutes on a CPU (MNIST: LeNet,
60,000 images, 6 epochs; CIFAR-10: cifar_cnn, the 8,068-image shared train set, 2 epochs), so the
absolute numbers on CIFAR-10 sit well below a ResNet-110 trained for 90 epochs; the budget is said in
the results.

Every run goes through ``robustlab.eval.runner.certify`` (the certified protocol, with its attack
check on the first ``--attack-n`` images), into ``benchmarks/.cache/smoothing_published.db``.

Steps (each (dataset, sigma) is its own process, so they can run side by side):

    nice python benchmarks/smoothing_published.py train --dataset mnist            # the three models
    nice python benchmarks/smoothing_published.py certify --dataset mnist --sigma 0.25 --images 200
    nice python benchmarks/smoothing_published.py table                           # results/*.txt

``train`` runs ``robustlab train`` with the ``noise`` recipe (the exact command is in the model's
card); ``certify`` writes ``benchmarks/results/smoothing_published/<dataset>_<sigma>.json``;
``table`` writes ``benchmarks/results/smoothing_published.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, RESULTS, environment, set_threads, shared_data_dir  # noqa: E402

SIGMAS = (0.25, 0.5, 1.0)
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
TRAIN = {  # architecture, images, epochs (sized for a CPU budget of ~10 min each on an idle core)
    "mnist": ("lenet", 60000, 6),
    "cifar10": ("cifar_cnn", 8068, 2),
}
COHEN_CIFAR = {  # sigma -> (certified accuracy at radius 0, ACR), Cohen et al. 2019 (ResNet-110, n = 100,000)
    0.25: (0.75, 0.42), 0.5: (0.65, 0.49), 1.0: (0.47, 0.46),
}
OUT = RESULTS / "smoothing_published"


def checkpoint(dataset: str, sigma: float) -> Path:
    return CACHE / f"smooth_{dataset}_{sigma}.safetensors"


def cmd_train(args) -> None:
    arch, n, epochs = TRAIN[args.dataset]
    for sigma in SIGMAS:
        out = checkpoint(args.dataset, sigma)
        if out.is_file():
            print(f"{out} exists")
            continue
        cmd = [sys.executable, "-m", "robustlab", "train", "--model", arch, "--data", args.dataset, "--data-root",
               str(shared_data_dir()), "--n", str(n), "--recipe", f"noise:sigma={sigma:g}", "--epochs", str(epochs),
               "--batch-size", "128", "--lr", "0.05", "--device", "cpu", "--out", str(out), "--seed", "0"]
        t = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        print(f"trained {out} in {time.time() - t:.0f} s")


def cmd_certify(args) -> None:
    from robustlab.data import load_dataset
    from robustlab.eval.protocols import CertifiedOptions
    from robustlab.eval.runner import certify
    from robustlab.eval.store import ResultsStore
    from robustlab.models import load_checkpoint

    set_threads(1)
    model, card = load_checkpoint(checkpoint(args.dataset, args.sigma))
    data = load_dataset(args.dataset, "test", root=shared_data_dir()).subset(args.images)
    options = CertifiedOptions(noise_params={"sigma": args.sigma}, n0=args.n0, n=args.n, alpha=args.alpha,
                               radii=RADII, attack_n=args.attack_n, attack_steps=args.attack_steps,
                               attack_draws=args.attack_draws, attack_radius=args.sigma)
    cpu, wall = time.process_time(), time.time()
    with ResultsStore(CACHE / "smoothing_published.db") as store:
        res = certify(model, data, options, store, seed=0, batch_size=10, resume=True, progress=False,
                      model_name=str(checkpoint(args.dataset, args.sigma).name))
    record = {
        "dataset": args.dataset, "sigma": args.sigma, "images": len(data), "n0": args.n0, "n": args.n,
        "alpha": args.alpha, "attack_n": args.attack_n, "run_id": res.run_id, "summary": res.summary,
        "checks": res.checks, "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.time() - wall,
        "training": card.training, "environment": environment(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.dataset}_{args.sigma:g}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    s = res.summary
    print(f"{args.dataset} sigma {args.sigma}: " + ", ".join(f"r={r}: {a:.3f}" for r, a in s["certified_accuracy"].items())
          + f"; ACR {s['acr']:.3f}; {record['cpu_seconds']:.0f} s CPU")


def cmd_table(args) -> None:
    lines = ["# Randomized smoothing: the shape of published results (Gaussian noise, L2 certificates)", ""]
    for dataset in ("mnist", "cifar10"):
        records = [json.loads(p.read_text()) for p in sorted(OUT.glob(f"{dataset}_*.json"))]
        if not records:
            continue
        records.sort(key=lambda r: r["sigma"])
        r0 = records[0]
        arch, n_train, epochs = TRAIN[dataset]
        lines.append(f"## {dataset}: {arch} trained with the noise recipe ({n_train} train images, {epochs} epochs, "
                     "SGD lr 0.05 cosine, batch 128, CPU)")
        lines.append(f"alpha {r0['alpha']}; attack check on the first attack_n images: empirical accuracy at radius = "
                     "sigma (certified accuracy on the same images in brackets), certificates contradicted / attacked")
        head = "sigma | images | n0/n | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR  | abstain | " \
            "empirical@sigma (cert.) | contradicted | CPU s | train s (wall)"
        lines.append(head)
        lines.append("-" * len(head))
        for rec in records:
            s = rec["summary"]
            acc = " | ".join(f"{s['certified_accuracy'][f'{r:g}']:.3f}" for r in RADII)
            emp = s.get("empirical") or {}
            empirical = (f"{emp['empirical_accuracy']:.2f} ({emp['certified_accuracy']:.2f})" if emp else "—")
            lie = s["lie_check"]
            lines.append(f"{rec['sigma']:<5} | {rec['images']:<6} | {rec['n0']}/{rec['n']} | {acc} | {s['acr']:.3f} | "
                         f"{s['abstain_rate']:.3f}   | {empirical:<23} | {lie['contradicted']}/{lie['attacked']:<10} | "
                         f"{rec['cpu_seconds']:<5.0f} | {rec['training'].get('seconds', 0):.0f}")
        if dataset == "cifar10":
            lines.append("Cohen et al. 2019 (ResNet-110, 90 epochs, full CIFAR-10 test set, n = 100,000):")
            for sigma, (acc0, acr) in COHEN_CIFAR.items():
                lines.append(f"{sigma:<5} | {acc0:.3f} | ... | ACR {acr:.3f}")
        max_r = {rec["sigma"]: next((c["detail"] for c in rec["checks"] if c["name"] == "draws"), "") for rec in records}
        lines.append("largest radius each n can certify: " + "; ".join(f"sigma {k}: {v.split('up to ')[-1]}"
                                                                      for k, v in max_r.items()))
        lines.append("")
    if args.note:
        lines += [args.note, ""]
    lines.append(f"environment: {environment()}")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "smoothing_published.txt").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["train", "certify", "table"])
    ap.add_argument("--dataset", choices=sorted(TRAIN), default="mnist")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--attack-n", type=int, default=20)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--attack-draws", type=int, default=4)
    ap.add_argument("--note", default="", help="table: a note to append (e.g. training CPU times)")
    args = ap.parse_args()
    {"train": cmd_train, "certify": cmd_certify, "table": cmd_table}[args.step](args)


if __name__ == "__main__":
    main()
