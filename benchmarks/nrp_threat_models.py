"""The Neural Representation Purifier (NRP, Naseer et al. 2020) under the paper's three threat
models, on MNIST and CIFAR-10, with the benchmarks' standard models (common.get_model: mnist_std,
cifar_std) as the protected classifiers.

The defender trains a purifier (robustlab.training.purifier, the default residual purifier, default
losses: feature + pixel) without labels on training images of the same data set, with SSP
perturbations against his own classifier's deepest feature map. Then, at Linf eps (MNIST 0.3,
CIFAR-10 8/255) and eps/2, accuracy on the adversarial images of the first N test images:

1. black-box: the attacker has neither the classifier nor the purifier; he crafts on an undefended
   surrogate of another architecture and seed (MI-FGSM, 10 steps, and SSP on the surrogate's deepest
   feature map, 20 steps) and the images go to the classifier with and without NRP. "restored" is
   the share of the accuracy the attack took that NRP gives back:
   (acc_NRP(adv) - acc(adv)) / (acc(clean) - acc(adv)).
2. gray-box: the attacker knows the classifier and that a purifier sits in front, but not its
   weights; he trains his own purifier on other data (MNIST: Fashion-MNIST; CIFAR-10: the other part
   of the training set) against his own surrogate's features, and runs PGD (10 steps) on classifier
   + his purifier, by BPDA (his purifier forward, identity backward: the straight-through attack of
   the paper's bypass script) and with gradients through his purifier. The images go to classifier +
   the defender's purifier.
3. white-box: PGD (10 steps) on classifier + the defender's purifier itself (gradients through it;
   and BPDA with the identity), and on dynamic NRP (Gaussian noise before purification, the paper's
   counter-measure) with EOT over 4 noise draws per step; dynamic predictions vote over 8 draws.

Also: the defense's inference cost as a CPU-time ratio to the bare model's forward pass (batch of
100, interleaved repeats, medians), and the purifier's training CPU time, extrapolated to 10,000
images from the measured run.

    nice python benchmarks/nrp_threat_models.py [--only mnist|cifar10] [--n 200]

Each data set writes benchmarks/results/nrp_threat_models_<data>.txt; the combined
benchmarks/results/nrp_threat_models.txt is written once both exist. Models and purifiers are cached
in benchmarks/.cache (the surrogates are trained on first use, minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    RECIPES,
    RESULTS,
    Recipe,
    environment,
    get_model,
    load_split,
    log,
    set_threads,
    time_interleaved,
    write_report,
)

from robustlab.attacks import create_attack
from robustlab.data import ImageDataset
from robustlab.defenses import apply_defenses
from robustlab.models.purifier import load_purifier, save_purifier
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig
from robustlab.training.purifier import PurifierConfig, default_layer, train_purifier

# The attacker's undefended surrogates: another architecture (MNIST) or width (CIFAR-10), another seed.
RECIPES["nrp_mnist_lenet"] = Recipe("nrp_mnist_lenet", "lenet", "mnist", train_subset=20000, epochs=3,
                                    batch_size=128, lr=0.05, seed=1)
RECIPES["nrp_cifar_cnn16"] = Recipe("nrp_cifar_cnn16", "cifar_cnn", "cifar10", train_subset=0, epochs=2,
                                    batch_size=128, lr=0.05, arch_kwargs={"width": 16}, augment=True, seed=1)

NOTES = """Reading the numbers (200 test images: one image is 0.5 points; differences of a few points are noise):
- "restored" is relative to the accuracy the attack took from the undefended model; where an attack takes
  little (CIFAR-10 at 4/255) NRP's own clean-accuracy cost dominates and the ratio is negative.
- MNIST gray-box: the attacker's purifier, trained on Fashion-MNIST against his surrogate's features,
  wrecks MNIST digits (his classifier + purifier: 10.5% clean), so his attacks barely transfer; that
  table shows a weak gray-box attacker, not a property of NRP. CIFAR-10's gray-box attacker is realistic.
- White-box attacks are PGD with 10 steps only (a CPU budget); more steps and restarts would lower the
  white-box numbers further, so they are upper bounds. BPDA with the identity is much weaker than
  gradients through the purifier: the purifier is differentiable and its gradients are the attack to use.
"""

SMOKE = False  # --smoke: tiny purifiers in /tmp, nothing written to results

SETTINGS = {
    "mnist": {
        "target": "mnist_std", "surrogate": "nrp_mnist_lenet", "eps": 0.3, "train_eps": 0.3, "sigma": 0.2,
        "defender": ("mnist", slice(0, 10000), 1), "attacker": ("fashion_mnist", slice(0, 3000), 1),
        "attacker_data": "Fashion-MNIST train[:3000]",
    },
    "cifar10": {
        "target": "cifar_std", "surrogate": "nrp_cifar_cnn16", "eps": 8 / 255, "train_eps": 16 / 255, "sigma": 0.05,
        "defender": ("cifar10", slice(0, 4000), 2), "attacker": ("cifar10", slice(4000, 6000), 1),
        "attacker_data": "CIFAR-10 train[4000:6000]",
    },
}


def purifier_for(tag: str, dataset: str, rows: slice, epochs: int, feature_key: str, eps: float) -> tuple[Path, dict]:
    """The purifier trained on ``dataset`` train[rows] for ``epochs`` against ``feature_key``'s deepest
    feature map (cached; trained with the defaults otherwise). Returns its path and card training record."""
    if SMOKE:
        rows, epochs = slice(rows.start, rows.start + 64), 1
    path = (Path("/tmp") if SMOKE else CACHE) / f"nrp_{tag}.safetensors"
    config = PurifierConfig(eps=eps, train=TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, optimizer="adam",
                                                       weight_decay=0.0, schedule="cosine", seed=0))
    recipe = {"dataset": dataset, "rows": [rows.start, rows.stop], "epochs": epochs, "feature": feature_key, "eps": eps}
    if path.is_file():
        _, card = load_purifier(path)
        if card.training.get("bench_recipe") == recipe:
            return path, card.training
    x, y = load_split(dataset, "train")
    data = ImageDataset(dataset, "train", x[rows], y[rows], [str(i) for i in range(10)])
    features, _ = get_model(feature_key)
    log(f"[{tag}] training a purifier on {len(data)} {dataset} images, {epochs} epoch(s), against {feature_key} ...")
    c0 = time.process_time()
    run = train_purifier(data, features, feature_key, config, progress=False, on_epoch=lambda r: log(f"[{tag}]   {r}"))
    cpu = time.process_time() - c0
    record = {**run.record, "bench_recipe": recipe, "cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads(),
              "cpu_seconds_per_10k_images": round(cpu / (len(data) * epochs) * 10000, 1)}
    save_purifier(run.purifier, path, "residual", {}, tuple(x.shape[2:]), record, dataset=f"{dataset}:train")
    return path, record


def accuracy(predict, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> float:
    with torch.no_grad():
        return float(sum(int((predict(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                         for i in range(0, len(y), batch)) / len(y))


def craft(attack, model, x: torch.Tensor, y: torch.Tensor, seed: int, batch: int = 100,
          all_steps: bool = False) -> torch.Tensor:
    """Adversarial images of ``attack`` against ``model`` (batches of ``batch``, seeded per batch); a
    defended model draws its noise from a generator seeded per batch as well. ``all_steps``: no
    sample stops early when ``model`` is fooled (as robustlab's transfer attack runs its base attack):
    where the images are judged on another model (transfer, gray-box) or by a vote over other random
    draws (dynamic NRP), fooling the attacker's view is no reason to stop."""
    if all_steps:
        attack.is_success = lambda logits, y: torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    out = []
    for b, i in enumerate(range(0, len(y), batch)):
        if hasattr(model, "set_generator"):
            model.set_generator(torch.Generator().manual_seed(seed + 1000 + b))
        out.append(attack.run(model, x[i:i + batch], y[i:i + batch], torch.Generator().manual_seed(seed + b)).x_adv)
    return torch.cat(out)


def voter(defended, seed: int = 7):
    """The defended model's prediction (majority vote over its draws), as logits-like one-hot scores."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        pred = defended.predict(x, torch.Generator().manual_seed(seed))
        return torch.nn.functional.one_hot(pred, 10).float()
    return predict


def pct(v: float) -> str:
    return f"{100 * v:5.1f}%"


def correct(predict, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Per image: whether ``predict`` classifies it right."""
    with torch.no_grad():
        return torch.cat([predict(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(y), batch)])


def run(name: str, n: int, on_partial=None) -> str:
    s = SETTINGS[name]
    model, card = get_model(s["target"])
    surrogate, scard = get_model(s["surrogate"])
    x_all, y_all = load_split(name, "test")
    x, y = x_all[:n], y_all[:n]
    ds, rows, epochs = s["defender"]
    p_def, rec_def = purifier_for(f"{name}_defender", ds, rows, epochs, s["target"], s["train_eps"])
    ads, arows, aepochs = s["attacker"]
    p_att, rec_att = purifier_for(f"{name}_attacker", ads, arows, aepochs, s["surrogate"], s["train_eps"])
    nrp = apply_defenses(model, [f"nrp:purifier={p_def}"])
    nrp_bpda = apply_defenses(model, [f"nrp:purifier={p_def},attack=bpda"])
    dyn_spec = f"nrp:purifier={p_def},dynamic=true,sigma={s['sigma']},draws=8"
    dynamic = apply_defenses(model, [dyn_spec])
    dyn_attack = apply_defenses(model, [dyn_spec.replace("draws=8", "draws=4")])  # EOT over 4 draws per step
    own = apply_defenses(model, [f"nrp:purifier={p_att}"])
    own_bpda = apply_defenses(model, [f"nrp:purifier={p_att},attack=bpda"])
    bare = lambda z: model(z)
    defended = lambda z: nrp(z)
    dyn_vote = voter(dynamic)

    title = (f"## {name}: {s['target']} (clean test accuracy {pct(card['clean_accuracy'])} on the full test set), "
             f"first {n} test images")
    lines = [title, ""]
    clean = {"undefended": accuracy(bare, x, y), "NRP": accuracy(defended, x, y), "dynamic NRP": accuracy(dyn_vote, x, y)}
    lines.append("clean accuracy: " + ", ".join(f"{k} {pct(v)}" for k, v in clean.items()))
    lines.append(f"defender's purifier: residual (default), trained on {ds} train[{rows.start}:{rows.stop}] for {epochs} "
                 f"epoch(s) against {s['target']} layer {rec_def['layer']}, SSP Linf {rec_def['ssp']['eps']:.4g}; "
                 f"final feature loss {rec_def['final']['train_feature_loss']:.3f} (unpurified "
                 f"{rec_def['final']['train_feature_loss_unpurified']:.3f})")
    lines.append(f"attacker's purifier (gray-box): trained on {s['attacker_data']} against his surrogate "
                 f"{s['surrogate']} ({scard['training']['recipe']['architecture']}, seed 1; clean "
                 f"{pct(scard['clean_accuracy'])}) layer {rec_att['layer']}")
    lines.append(f"clean accuracy of the attacker's pipeline (classifier + his purifier): {pct(accuracy(own, x, y))}")
    lines.append(f"dynamic NRP: Gaussian noise sigma {s['sigma']} clipped to {rec_def['ssp']['eps']:.4g}, "
                 f"votes over 8 draws")
    lines.append("")

    tables: dict[str, list[str]] = {"black": [], "gray": [], "white": []}
    head = list(lines)

    def render(partial_eps: float | None) -> list[str]:
        note = [f"(partial: finished up to eps {partial_eps:.4g})", ""] if partial_eps is not None else []
        return [*head, *note, ("### 1. black-box: transfer from an undefended surrogate (accuracy on the adversarial "
                "images)"), "",
                "| eps | attack | undefended | NRP | dynamic NRP | restored by NRP |",
                "| --- | --- | --- | --- | --- | --- |", *tables["black"], "",
                "### 2. gray-box: the attacker's own purifier, trained on other data", "",
                "| eps | attack | undefended | NRP | dynamic NRP |", "| --- | --- | --- | --- | --- |",
                *tables["gray"], "",
                "### 3. white-box: the defender's purifier known", "",
                "| eps | attack | judged on | accuracy |", "| --- | --- | --- | --- |", *tables["white"], ""]

    layer = default_layer(surrogate, tuple(x.shape[1:]))
    for eps in (s["eps"], s["eps"] / 2):
        threat = ThreatModel("linf", eps)
        e = f"{eps:.4g}"
        log(f"[{name}] eps {e}: black-box ...")
        for label, attack in (("MI-FGSM-10 on the surrogate", create_attack("mifgsm", threat, steps=10)),
                              (f"SSP-20 on the surrogate ({layer})", create_attack("ssp", threat, steps=20, layer=layer))):
            adv = craft(attack, surrogate, x, y, seed=1, all_steps=True)
            und, pur = accuracy(bare, adv, y), accuracy(defended, adv, y)
            dyn = accuracy(dyn_vote, adv, y)
            lost = clean["undefended"] - und
            restored = (pur - und) / lost if lost > 0 else float("nan")
            tables["black"].append(f"| {e} | {label} | {pct(und)} | {pct(pur)} | {pct(dyn)} | "
                                   f"{100 * restored:.0f}% |")
        log(f"[{name}] eps {e}: gray-box ...")
        pgd = create_attack("pgd", threat, steps=10)
        for label, view in (("PGD-10, BPDA through his purifier", own_bpda),
                            ("PGD-10, gradients through his purifier", own)):
            adv = craft(create_attack("pgd", threat, steps=10), view, x, y, seed=2, all_steps=True)
            tables["gray"].append(f"| {e} | {label} | {pct(accuracy(bare, adv, y))} | {pct(accuracy(defended, adv, y))} |"
                                  f" {pct(accuracy(dyn_vote, adv, y))} |")
        log(f"[{name}] eps {e}: white-box ...")
        adv = craft(pgd, model, x, y, seed=3)
        tables["white"].append(f"| {e} | PGD-10 on the undefended model | undefended | {pct(accuracy(bare, adv, y))} |")
        adv = craft(pgd, nrp, x, y, seed=3)
        through = correct(defended, adv, y)
        tables["white"].append(f"| {e} | PGD-10, gradients through the purifier | NRP | {pct(through.float().mean())} |")
        adv_bpda = craft(pgd, nrp_bpda, x, y, seed=3)
        straight = correct(defended, adv_bpda, y)
        tables["white"].append(f"| {e} | PGD-10, BPDA (identity) through the purifier | NRP | "
                               f"{pct(straight.float().mean())} |")
        tables["white"].append(f"| {e} | worst case of the two per image | NRP | {pct((through & straight).float().mean())} |")
        eot = craft(create_attack("pgd", threat, steps=10, eot=4), dyn_attack, x, y, seed=3, all_steps=True)
        tables["white"].append(f"| {e} | PGD-10 through noise + purifier, EOT 4 draws per step | dynamic NRP | "
                               f"{pct(accuracy(dyn_vote, eot, y))} |")
        # the static white-box attack (the images above), sent to the dynamic defense
        tables["white"].append(f"| {e} | PGD-10 through the static purifier (no noise, no EOT) | dynamic NRP | "
                               f"{pct(accuracy(dyn_vote, adv, y))} |")
        if on_partial is not None:
            on_partial(render(eps))

    lines = render(None)
    xb = x[:100]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        timing = time_interleaved({
            "bare": lambda: model(xb),
            "NRP": lambda: nrp.predict(xb, g),
            "dynamic NRP (8 draws)": lambda: dynamic.predict(xb, g),
        }, repeats=7, warmup=True)
    base = timing["bare"]["cpu"]
    lines.append("inference cost (CPU-time ratio to the bare model's forward pass, batch of 100, median of 7): "
                 + ", ".join(f"{k} {v['cpu'] / base:.1f}x" for k, v in timing.items() if k != "bare"))
    lines.append(f"purifier training CPU time: {rec_def['cpu_seconds']:.0f} s for {epochs} epoch(s) over "
                 f"{rows.stop - rows.start} images ({rec_def['threads']} thread), i.e. "
                 f"{rec_def['cpu_seconds_per_10k_images']:.0f} s per 10,000 images (one epoch; extrapolated per "
                 f"image from the measured run) for the default size (residual purifier, width 32, 4 blocks; "
                 f"SSP 5 steps against {s['target']}; batch 64)")
    lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SETTINGS), help="one data set (default: both, one after the other)")
    parser.add_argument("--n", type=int, default=200, help="test images per data set")
    parser.add_argument("--combine", action="store_true", help="only write the combined file from the per-data-set ones")
    parser.add_argument("--smoke", action="store_true", help="check the code path: tiny purifiers, nothing written")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    set_threads(1)
    torch.manual_seed(0)
    for name in [] if args.combine else [args.only] if args.only else list(SETTINGS):
        t0 = time.perf_counter()
        partial = RESULTS / f"nrp_threat_models_{name}.txt"
        text = run(name, args.n, None if SMOKE else
                   lambda rows, p=partial: p.write_text("\n".join(rows) + "\n", encoding="utf-8"))
        text += f"({name}: {time.perf_counter() - t0:.0f} s wall)\n"
        if SMOKE:
            print(text)
            continue
        write_report(text, RESULTS / f"nrp_threat_models_{name}.txt")
    parts = [RESULTS / f"nrp_threat_models_{name}.txt" for name in SETTINGS]
    if all(p.is_file() for p in parts):
        header = ("# NRP (Naseer et al. 2020) under the paper's threat models, MNIST and CIFAR-10\n\n"
                  f"{environment()}\n\n" + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n" + NOTES + "\n")
        write_report(header + "\n".join(p.read_text(encoding="utf-8") for p in parts), RESULTS / "nrp_threat_models.txt")


if __name__ == "__main__":
    main()
