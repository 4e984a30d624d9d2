"""PGD fidelity and speed: robustlab against torchattacks, ART and foolbox.

The claim under test (from the issue):

- Fidelity: on the same model and the same examples, at equal steps and step size, robustlab's PGD is
  never weaker than torchattacks' and ART's (or foolbox's): its robust accuracy is at most 0.5 points
  above theirs. Shown on an MNIST model (standard and PGD-trained) and a CIFAR-10 model.
- Speed: a k-step PGD costs at most 1.15x the time of k forward+backward passes over the same batch
  (the physical floor), and is not slower than the fastest peer on the same batch.

The floor is one forward + backward (to the input only) at each of the k points PGD visits (a
reference trajectory from the same kind of random start, computed untimed), in the faster of two
memory layouts: the model as given, and a channels-last copy (robustlab's attacks run inside
``fast_runtime``, as its evaluation runs them: a convolutional model channels-last on CPU;
torchattacks also runs on that copy, for equal terms).
Not k passes over the clean images: CPU kernels can run faster on clean MNIST digits (80% exact zeros) than on perturbed
images (on the development machine, max-pooling of SmallCNN up to 4x and the whole pass ~35% at batch
200; about the same at batch 100), and no attack ever evaluates the clean images k times. The report
shows the clean-image passes for reference.
Times are process CPU time by default (``--clock``): other processes on a shared machine stretch wall
time, not this process's CPU time. Each is the fastest of ``--repeats`` interleaved repeats:
interference (other processes, cache pollution) only ever adds time, and two identical floor runs
differed by up to 7% when medians of 3 were used.

robustlab is seeded so that its random start equals torchattacks' and foolbox's (all three draw
from a torch generator seeded the same way, in the same order): against those two the comparison
is paired and only the algorithms differ. ART draws its start from numpy, so against ART part of
the difference is the luck of the draw; the report counts the examples only one side breaks and
gives a one-sided sign test, so a gap within that noise is told apart from a real one. Robust
accuracy is averaged over several seeds (``--fidelity-seeds``, default 3) for the same reason.

Every tool gets the same model (eval mode), the same first-N test examples, eps, step size, number of
steps and a random start. Robust accuracy is measured the same way for all: a fresh forward pass on the
returned batch; the returned points are also checked to lie in the threat model.

robustlab's PGD stops attacking a sample once it is misclassified and keeps that first success, so it
spends less time than the floor on models that break easily. To keep the floor ratio honest the run
also times robustlab, the floor and the fastest peer on a batch of points that survive every tool's
attack on the PGD-trained model, where (almost) nothing stops early.

Usage: python benchmarks/pgd_vs_peers.py [--n-mnist 1000] [--n-cifar 500] [--threads 1] [--quick]
The report is printed and written to benchmarks/results/pgd_vs_peers.txt.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    environment,
    fidelity_status,
    forward_pass,
    get_model,
    input_gradient_floor,
    load_split,
    log,
    pgd_iterates,
    predict,
    robustlab_runtime,
    set_threads,
    time_interleaved,
    write_report,
)
from robustlab.attacks import create_attack  # noqa: E402
from robustlab.seeding import make_generator  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

FIDELITY_SLACK = 0.5  # points of robust accuracy robustlab may lie above a peer
FLOOR_BUDGET = 1.15  # robustlab time / (k x forward+backward)
PEER_BUDGET = 1.0  # robustlab time / fastest peer

PEERS = ("torchattacks", "art", "foolbox")
TOOLS = ("robustlab",) + PEERS

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scenario:
    """One comparison: a model, a threat model, PGD settings and the examples."""

    model_key: str
    norm: str  # linf | l2
    eps: float
    alpha: float
    steps: int
    n: int  # first-n test examples for robust accuracy
    time_batch: int  # first-b examples for the interleaved timing
    eps_label: str
    no_early_stop_batch: int = 0  # >0: also time on this many points that survive the attack

    @property
    def title(self) -> str:
        return f"{self.model_key}  {self.norm} eps={self.eps_label}  alpha={self.alpha:.4g}  steps={self.steps}"


# ---------------------------------------------------------------------- the contenders


def make_attacks(model: nn.Module, sc: Scenario, shape: tuple[int, ...], seed: int) -> dict[str, AttackFn]:
    """Each tool's PGD for this scenario as a function (x, y) -> x_adv; wrappers are built here,
    outside any timed region. Seeds are reset inside so every call draws the same random start."""
    import foolbox as fb
    import torchattacks
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    threat = ThreatModel(sc.norm, sc.eps)
    ours = create_attack("pgd", threat, steps=sc.steps, alpha=sc.alpha, random_start=True, loss="ce")

    def run_robustlab(x, y):
        # Seeded like torch.manual_seed(seed): the same random start as torchattacks and foolbox,
        # which draw theirs from torch's global generator the same way, so those comparisons are
        # paired (only the algorithms differ). ART draws from numpy's generator. In the runtime an
        # evaluation applies (channels-last on CPU), probed with one image so the probe costs ~nothing.
        with robustlab_runtime(model, x):
            return ours.run(model, x, y, torch.Generator().manual_seed(seed)).x_adv

    ta_cls = torchattacks.PGD if sc.norm == "linf" else torchattacks.PGDL2
    ta = ta_cls(model, eps=sc.eps, alpha=sc.alpha, steps=sc.steps, random_start=True)

    def run_torchattacks(x, y):
        torch.manual_seed(seed)
        return ta(x, y)

    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(shape[1:]), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="cpu",
    )

    def run_art(x, y):
        np.random.seed(seed)
        torch.manual_seed(seed)
        art_attack = ProjectedGradientDescentPyTorch(
            classifier, norm=np.inf if sc.norm == "linf" else 2, eps=sc.eps, eps_step=sc.alpha,
            max_iter=sc.steps, num_random_init=1, batch_size=len(x), verbose=False,
        )
        return torch.from_numpy(art_attack.generate(x.numpy(), y=y.numpy()))

    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    fb_cls = fb.attacks.LinfPGD if sc.norm == "linf" else fb.attacks.L2PGD
    fb_attack = fb_cls(abs_stepsize=sc.alpha, steps=sc.steps, random_start=True)

    def run_foolbox(x, y):
        torch.manual_seed(seed)
        _, clipped, _ = fb_attack(fmodel, x, y, epsilons=sc.eps)
        return clipped

    return {"robustlab": run_robustlab, "torchattacks": run_torchattacks, "art": run_art, "foolbox": run_foolbox}


# ---------------------------------------------------------------------- one scenario

# Tools whose call returns adversarial images only: knowing which points broke costs a forward pass
# more. robustlab (``AttackResult.success``) and foolbox (its ``success``) return the verdict.
NEEDS_VERDICT = ("torchattacks", "art")


def run_scenario(sc: Scenario, repeats: int, seed: int, clock: str, fidelity_seeds: int) -> dict:
    model, card = get_model(sc.model_key)
    dataset = card["dataset"]
    x_all, y_all = load_split(dataset, "test")
    x, y = x_all[: sc.n].contiguous(), y_all[: sc.n].contiguous()
    threat = ThreatModel(sc.norm, sc.eps)
    clean = float((predict(model, x) == y).float().mean())
    attacks = make_attacks(model, sc, tuple(x.shape), seed)
    # robustlab's attacks run in fast_runtime (a convolutional model channels-last on CPU); the peers
    # run the model as given. The same floor and torchattacks on a channels-last copy show equal terms.
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    torchattacks_cl = make_attacks(model_cl, sc, tuple(x.shape), seed)["torchattacks"]

    # Fidelity: each tool on all n examples, once per seed (seed, seed + 1, ...): a random start
    # moves robust accuracy by a few examples either way, so single-seed gaps are noisy.
    fidelity: dict[str, dict] = {tool: {"robust_acc": 0.0, "valid": 1.0, "max_excess": -float("inf"), "seconds": 0.0}
                                 for tool in TOOLS}
    per_seed: list[dict[str, torch.Tensor]] = []
    for s in range(seed, seed + fidelity_seeds):
        seeded = attacks if s == seed else make_attacks(model, sc, tuple(x.shape), s)
        correct: dict[str, torch.Tensor] = {}
        for tool in TOOLS:
            log(f"  {tool}: attacking {len(y)} examples (seed {s}) ...")
            t0 = time.perf_counter()
            x_adv = seeded[tool](x, y).detach().to(x.dtype)
            f = fidelity[tool]
            f["seconds"] += (time.perf_counter() - t0) / fidelity_seeds
            correct[tool] = predict(model, x_adv) == y
            f["robust_acc"] += float(correct[tool].float().mean()) / fidelity_seeds
            f["valid"] = min(f["valid"], float(threat.contains(x_adv, x, tol=1e-5).float().mean()))
            f["max_excess"] = max(f["max_excess"], float((threat.distance(x_adv, x) - sc.eps).max()))
        per_seed.append(correct)
    for tool in PEERS:
        # Examples only one of the two breaks (McNemar), summed over seeds: the difference is
        # (b - c) / (n * seeds), and its noise from the random starts about sqrt(b + c) / (n * seeds).
        fidelity[tool]["only_peer"] = sum(int((c["robustlab"] & ~c[tool]).sum()) for c in per_seed)
        fidelity[tool]["only_robustlab"] = sum(int((~c["robustlab"] & c[tool]).sum()) for c in per_seed)
    correct = per_seed[0]
    survived = torch.stack(list(correct.values())).all(dim=0)

    # Speed: interleaved repeats; the floor over the points a PGD trajectory visits.
    def timing(xb: torch.Tensor, yb: torch.Tensor, tools: tuple[str, ...] = TOOLS) -> dict[str, dict]:
        iterates = pgd_iterates(model, xb, yb, threat, sc.alpha, sc.steps, make_generator(seed, 1))
        contenders = {
            "floor": lambda: input_gradient_floor(model, iterates, yb),
            "floor-cl": lambda: input_gradient_floor(model_cl, iterates, yb),
            "forward": lambda: forward_pass(model, iterates[-1]),
            "forward-cl": lambda: forward_pass(model_cl, iterates[-1]),
            "torchattacks-cl": lambda: torchattacks_cl(xb, yb),
        }
        for tool in tools:
            contenders[tool] = (lambda t: (lambda: attacks[t](xb, yb)))(tool)
        log(f"  timing {len(yb)} examples x {repeats} interleaved repeats ...")
        raw = time_interleaved(contenders, repeats)
        out = {name: raw[name][clock + "_min"] for name in raw}
        # For reference, once: the same number of passes over the clean batch.
        clean = time_interleaved({"clean": lambda: input_gradient_floor(model, [xb] * sc.steps, yb)}, 1)
        out["floor@clean"] = clean["clean"][clock + "_min"]
        for tool in tools:
            out[tool + "+verdict"] = out[tool] + (out["forward"] if tool in NEEDS_VERDICT else 0.0)
        out["torchattacks-cl+verdict"] = out["torchattacks-cl"] + out["forward-cl"]
        return out

    b = min(sc.time_batch, len(y))
    timed = timing(x[:b].contiguous(), y[:b].contiguous())

    hard = None
    if sc.no_early_stop_batch:
        idx = survived.nonzero(as_tuple=True)[0][: sc.no_early_stop_batch]
        if len(idx) >= 10:
            xh, yh = x[idx].contiguous(), y[idx].contiguous()
            # Against the peer that was fastest on the first batch (the others are far behind).
            fastest = min(PEERS, key=lambda p: timed[p])
            hard = {"n": len(idx), "times": timing(xh, yh, ("robustlab", fastest))}
            # How many of these points robustlab still breaks (each one cuts its work short).
            hard["broken_by_robustlab"] = int((predict(model, attacks["robustlab"](xh, yh)) != yh).sum())
    return {"scenario": sc, "clean": clean, "card": card, "fidelity": fidelity, "timing": timed, "time_batch": b,
            "hard": hard, "fidelity_seeds": fidelity_seeds}


# ---------------------------------------------------------------------- report


def _speed_lines(t: dict, indent: str) -> tuple[list[str], dict[str, float]]:
    """Per-tool times and the ratios the budgets are about."""
    floor = min(t["floor"], t["floor-cl"])  # the faster memory layout's
    tools = [tool for tool in TOOLS if tool in t] + ["torchattacks-cl"]
    peers = [tool for tool in PEERS if tool in t]
    fastest = min(peers, key=lambda p: t[p])
    fastest_v = min(peers, key=lambda p: t[p + "+verdict"])
    ratios = {
        "floor": t["robustlab"] / floor,
        "peer": t["robustlab"] / t[fastest],
        "peer_verdict": t["robustlab+verdict"] / t[fastest_v + "+verdict"],
        "peer_cl": t["robustlab"] / t["torchattacks-cl"],
        "peer_cl_verdict": t["robustlab+verdict"] / t["torchattacks-cl+verdict"],
    }
    lines = [
        f"{indent}{'':15s} {'time (s)':>9s} {'x floor':>8s} {'rl / tool':>9s} {'+verdict':>9s} {'rl / tool':>9s}",
        f"{indent}{'floor':15s} {t['floor']:9.3f} {t['floor'] / floor:8.2f}   (the model as given)",
        f"{indent}{'floor-cl':15s} {t['floor-cl']:9.3f} {t['floor-cl'] / floor:8.2f}   (a channels-last copy)",
        f"{indent}{'floor@clean':15s} {t['floor@clean']:9.3f} {t['floor@clean'] / floor:8.2f}"
        f"   (the same number of passes over the clean batch; one run, for reference)",
    ]
    for tool in tools:
        rt = "" if tool == "robustlab" else f"{t['robustlab'] / t[tool]:9.2f}"
        rv = "" if tool == "robustlab" else f"{t['robustlab+verdict'] / t[tool + '+verdict']:9.2f}"
        lines.append(f"{indent}{tool:15s} {t[tool]:9.3f} {t[tool] / floor:8.2f} {rt:>9s} "
                     f"{t[tool + '+verdict']:9.3f} {rv:>9s}")
    lines.append(f"{indent}robustlab / floor = {ratios['floor']:.2f} (budget <= {FLOOR_BUDGET}); robustlab / fastest peer "
                 f"= {ratios['peer']:.2f} ({fastest}), with the verdict pass = {ratios['peer_verdict']:.2f} "
                 f"({fastest_v}) (budget <= {PEER_BUDGET}); / torchattacks on a channels-last copy = "
                 f"{ratios['peer_cl']:.2f}, with the verdict pass = {ratios['peer_cl_verdict']:.2f}")
    ratios["fastest"], ratios["fastest_v"] = fastest, fastest_v
    return lines, ratios


def format_report(results: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab PGD vs torchattacks / ART / foolbox: fidelity and speed")
    out("=" * 78)
    out(f"machine: {environment()}")
    out(f"command: python benchmarks/pgd_vs_peers.py {' '.join(sys.argv[1:])}".rstrip())
    clock = "process CPU time" if args.clock == "cpu" else "wall time"
    out(f"robust accuracy: mean over seeds {args.seed}..{args.seed + args.fidelity_seeds - 1} (one run per tool and seed)")
    out(f"times: the fastest of {args.repeats} interleaved repeats of {clock} (interference only adds time)")
    out("floor = forward + backward to the input only at each of the k points PGD visits on the same batch")
    out("(a reference PGD trajectory without early stopping, random start included), the faster of the model")
    out("as given and a channels-last copy (robustlab's attacks run in fast_runtime, that layout on CPU);")
    out("+verdict = plus the forward pass that tells which returned points are adversarial, for tools whose")
    out("call returns images only (torchattacks, ART); robustlab and foolbox return the verdict.")
    out("")
    out("models (trained by benchmarks/common.py, cached in benchmarks/.cache/):")
    seen = set()
    for r in results:
        key = r["scenario"].model_key
        if key in seen:
            continue
        seen.add(key)
        card, rec = r["card"], r["card"]["training"]["recipe"]
        how = (f"PGD-AT linf eps={rec['adversarial']['eps']} steps={rec['adversarial']['steps']} from {rec['init']}"
               if rec.get("adversarial") else "standard")
        out(f"  {key:10s} {card['architecture']:9s} {how}; {rec['train_subset'] or 'all'} train images x "
            f"{rec['epochs']} epoch(s), {card['training']['seconds']:.0f} s; clean test acc "
            f"{100 * card['clean_accuracy']:.2f}% (full test split)")
    checks: list[tuple[str, bool | str, str]] = []
    for r in results:
        sc: Scenario = r["scenario"]
        fid = r["fidelity"]
        out("")
        out("-" * 78)
        out(f"{sc.title}")
        runs = sc.n * r["fidelity_seeds"]
        out(f"  robust accuracy on the first {sc.n} test examples (clean {100 * r['clean']:.1f}%), "
            f"mean of {r['fidelity_seeds']} seed(s):")
        out(f"  {'tool':13s} {'robust acc':>10s} {'rl - tool':>10s} {'noise':>6s} {'only tool':>9s} {'only rl':>8s} "
            f"{'in ball':>8s} {'run (s)':>8s}")
        ours = fid["robustlab"]["robust_acc"]
        for tool in TOOLS:
            f = fid[tool]
            if tool == "robustlab":
                extra = f"{'':>10s} {'':>6s} {'':>9s} {'':>8s}"
            else:
                noise = 100 * (f["only_peer"] + f["only_robustlab"]) ** 0.5 / runs
                extra = (f"{100 * (ours - f['robust_acc']):+10.1f} {noise:6.1f} {f['only_peer']:9d} "
                         f"{f['only_robustlab']:8d}")
            out(f"  {tool:13s} {100 * f['robust_acc']:9.1f}% {extra} {100 * f['valid']:7.1f}% {f['seconds']:8.1f}")
        worst = max(PEERS, key=lambda p: ours - fid[p]["robust_acc"])
        worst_gap = 100 * (ours - fid[worst]["robust_acc"])
        status, p_value = fidelity_status(worst_gap, FIDELITY_SLACK, fid[worst]["only_peer"], fid[worst]["only_robustlab"])
        out(f"  fidelity: robustlab - strongest peer ({worst}) = {worst_gap:+.1f} points (budget <= +{FIDELITY_SLACK}); "
            f"sign test p = {p_value:.2f}")
        out("  (only tool / only rl: examples only that tool / only robustlab breaks; summed over seeds; noise ~ sqrt(sum) / (n x seeds) points)")
        checks.append((f"fidelity {sc.title}", status, f"{worst_gap:+.1f} pt vs {worst}, sign test p = {p_value:.2f}"))
        bad = [tool for tool in TOOLS if fid[tool]["valid"] < 1.0]
        if bad:
            out("  outside the threat model (tol 1e-5): " + ", ".join(
                f"{tool} {100 * (1 - fid[tool]['valid']):.1f}% (max excess {fid[tool]['max_excess']:.2g})" for tool in bad))
        out(f"  speed on the first {r['time_batch']} examples:")
        speed, ratios = _speed_lines(r["timing"], "    ")
        lines.extend(speed)
        checks.append((f"floor    {sc.title}", ratios["floor"] <= FLOOR_BUDGET, f"{ratios['floor']:.2f}x"))
        checks.append((f"peers    {sc.title}", ratios["peer"] <= PEER_BUDGET, f"{ratios['peer']:.2f}x ({ratios['fastest']})"))
        checks.append((f"peers+v  {sc.title}", ratios["peer_verdict"] <= PEER_BUDGET,
                       f"{ratios['peer_verdict']:.2f}x ({ratios['fastest_v']})"))
        checks.append((f"peers-cl+v {sc.title}", ratios["peer_cl_verdict"] <= PEER_BUDGET,
                       f"{ratios['peer_cl_verdict']:.2f}x (torchattacks, channels-last copy)"))
        hard = r["hard"]
        if hard:
            out(f"  no early stop: {hard['n']} examples that survive every tool's attack above "
                f"(robustlab still breaks {hard['broken_by_robustlab']} of them with this seed); "
                "against the fastest peer above:")
            speed, ratios = _speed_lines(hard["times"], "    ")
            lines.extend(speed)
            tag = f"no early stop, {sc.title}"
            checks.append((f"floor    {tag}", ratios["floor"] <= FLOOR_BUDGET, f"{ratios['floor']:.2f}x"))
            checks.append((f"peers    {tag}", ratios["peer"] <= PEER_BUDGET, f"{ratios['peer']:.2f}x ({ratios['fastest']})"))
            checks.append((f"peers+v  {tag}", ratios["peer_verdict"] <= PEER_BUDGET,
                           f"{ratios['peer_verdict']:.2f}x ({ratios['fastest_v']})"))
            checks.append((f"peers-cl+v {tag}", ratios["peer_cl_verdict"] <= PEER_BUDGET,
                           f"{ratios['peer_cl_verdict']:.2f}x (torchattacks, channels-last copy)"))
    out("")
    out("=" * 78)
    out("checks (fidelity: robust accuracy robustlab - peer <= +0.5 points; floor: robustlab / floor <= 1.15;")
    out("peers: robustlab / fastest peer <= 1.0, raw calls; peers+v: the same counting the verdict pass;")
    out("peers-cl+v: against torchattacks on a channels-last copy of the model, counting the verdict pass)")
    for name, ok, value in checks:
        status = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
        out(f"  {status:5s} {name}: {value}")
    out("(NOISE: above the budget, but the examples only the peer breaks do not outnumber those only robustlab")
    out(" breaks significantly (one-sided sign test p >= 0.05): a different random start, not a weaker attack)")
    out(f"total wall time {wall:.0f} s, CPU time {time.process_time():.0f} s (model training included when it ran)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    nm, nc = args.n_mnist, args.n_cifar
    bm, bc = args.time_batch_mnist, args.time_batch_cifar
    out = [
        Scenario("mnist_std", "linf", 0.3, 0.01, 10, nm, bm, "0.3"),
        Scenario("mnist_pgd", "linf", 0.3, 0.01, 10, nm, bm, "0.3", no_early_stop_batch=bm),
        Scenario("mnist_pgd", "linf", 0.3, 0.01, 40, max(1, 2 * nm // 5), max(1, bm // 2), "0.3",
                 no_early_stop_batch=max(1, bm // 2)),
        Scenario("cifar_std", "linf", 8 / 255, 2 / 255, 10, nc, bc, "8/255"),
    ]
    if not args.no_l2:
        out.append(Scenario("mnist_pgd", "l2", 2.0, 0.2, 10, max(1, nm // 2), bm, "2.0"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-mnist", type=int, default=1000, help="MNIST test examples for robust accuracy")
    parser.add_argument("--n-cifar", type=int, default=500, help="CIFAR-10 test examples for robust accuracy")
    parser.add_argument("--time-batch-mnist", type=int, default=100, help="MNIST batch for timing")
    parser.add_argument("--time-batch-cifar", type=int, default=50, help="CIFAR-10 batch for timing")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (the fastest counts)")
    parser.add_argument("--fidelity-seeds", type=int, default=3, help="seeds averaged for robust accuracy")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, fixed for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time measure: process CPU time (steady on a shared machine) or wall time")
    parser.add_argument("--no-l2", action="store_true", help="skip the L2 comparison")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few examples, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS / "pgd_vs_peers.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_mnist, args.n_cifar, args.time_batch_mnist, args.time_batch_cifar, args.repeats = 100, 50, 40, 20, 1
        args.fidelity_seeds = 1
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    for key in ("mnist_std", "mnist_pgd", "cifar_std"):
        get_model(key)  # train (first run only) before anything is timed
    results = []
    for sc in scenarios(args):
        log(f"== {sc.title}")
        results.append(run_scenario(sc, args.repeats, args.seed, args.clock, args.fidelity_seeds))
    report = format_report(results, args, time.perf_counter() - t0)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
