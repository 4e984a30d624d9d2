"""The fidelity matrix: every attack in robustlab's registry against its peer implementation(s), on a
standard and an adversarially trained model per data set (MNIST and CIFAR-10), one table, a verdict
per row.

Table-driven: ``ROWS`` lists, per attack, the mode of comparison, the budget both tools get and the
threat model per data set; ``benchmarks/peers.py`` maps the attack name to its peer adapters. A row
whose attack is not registered in this build prints "not in this build"; a registered attack with no
row, or no peer in the table, prints "no peer". Adding an attack to the matrix is one row here and
one adapter in peers.py.

Modes and verdicts (every adversarial point is judged afresh: a fresh prediction, in the box, and in
the threat model):

- ``fixed`` (an Lp ball at eps): robust accuracy. PASS if robustlab's is at most 0.5 points above
  the peer's; above, NOISE if the points only the peer breaks do not significantly outnumber those
  only robustlab breaks (one-sided sign test p >= 0.05), else FAIL.
- ``min`` (minimum-norm): the median norm found over the attacked points (a failure counts as
  infinite). PASS if robustlab's median is at most the peer's (0.1% relative slack); above, NOISE if
  the points where the peer's norm is smaller do not significantly outnumber those where robustlab's
  is (the same one-sided sign test, paired per point), else FAIL.
- ``sparse`` (OnePixel, Pixle): the points broken with the attack's own budget (OnePixel: at most
  ``pixels`` changed pixels); judged like ``fixed``.
- ``spatial``: robust accuracy under rotations and translations; robustlab's points re-rendered from
  their parameters; ART's SpatialTransformation (the one grid transformation that fools most
  images, applied to all) judged by a fresh prediction; like ``fixed``.
- ``universal``, ``patch``: one perturbation / one patch fitted by each tool on the same training
  images, then evaluated identically on the test images (universal: clip(x + delta) with the
  perturbation in the ball; patch: the worst position on a stride-2 grid). With one fit per tool,
  like ``fixed``; with several (``fits``, seeds seed, seed + 1, ...) the fits are the samples (the
  points of one fit share one perturbation, so a per-point test would take the luck of a single
  fit for a difference between the tools): PASS if robustlab's mean robust accuracy is at most 0.5
  points above the peer's, NOISE unless a one-sided Welch t-test finds it higher (p < 0.05).

Also printed: each tool's wall time, robustlab's time over the time spent inside the model
(forward and backward passes, measured by ``ModelClock``: 1.00x is the floor a gradient-based
attack making these model calls cannot beat), and query counts for the decision-based rows.

Sizes (defaults; ``--scale`` multiplies them): the first 100 MNIST / 50 CIFAR-10 test images
(only the correctly classified ones are attacked; decision-based and differential-evolution rows use
fewer, stated per row), budgets per row below, reduced from the defaults so that the whole matrix
runs in well under an hour on 2 shared CPU cores with ``nice``; both tools get the same budget.
Models: ``benchmarks/common.py`` (mnist_std, mnist_pgd, cifar_std, cifar_at; trained on first use).

Usage: python benchmarks/fidelity_matrix.py [--only pgd,boundary,fmn:linf] [--models mnist_std,cifar_std]
       [--scale 1.0] [--threads 1] [--seed 0]
The report is printed and written to benchmarks/results/fidelity_matrix.txt.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    ModelClock,
    environment,
    fidelity_status,
    get_model,
    load_split,
    log,
    predict,
    robustlab_runtime,
    set_threads,
    sign_test,
    write_report,
)
from benchmarks.peers import PEERS, Row, build_peer, median  # noqa: E402
from robustlab.attacks import ATTACKS, create_attack  # noqa: E402
from robustlab.errors import RobustlabError  # noqa: E402
from robustlab.seeding import make_generator  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402
from robustlab.threat_kinds import PatchThreat, SpatialThreat, UniversalThreat  # noqa: E402

ACC_SLACK = 0.5  # points
NORM_SLACK = 1e-3  # relative
MODELS = ("mnist_std", "mnist_pgd", "cifar_std", "cifar_at_small")
EPS = {  # per norm and data set: the usual budgets
    "linf": {"mnist": 0.3, "cifar10": 8 / 255},
    "l2": {"mnist": 2.0, "cifar10": 0.5},
    "l1": {"mnist": 10.0, "cifar10": 12.0},
}


@dataclass
class Spec:
    """One row of the matrix (run on every model). n: images per data set (first n test images)."""

    attack: str
    mode: str
    norm: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    peer_params: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=lambda: {"mnist": 60, "cifar10": 30})
    kind_args: dict[str, Any] = field(default_factory=dict)  # spatial/patch/universal threat arguments per data set
    note: str = ""
    eps: dict[str, float] = field(default_factory=dict)  # min rows: a budget per data set (default: none)
    fits: int = 1  # universal/patch rows: fits per tool (seeds seed, seed + 1, ...), compared as samples


FIT = 300  # training images a universal perturbation or patch is fitted on
FEW = {"mnist": 5, "cifar10": 3}
SOME = {"mnist": 20, "cifar10": 10}

ROWS: list[Spec] = [
    Spec("boundary", "min", "l2", {"queries": 2000}, {"steps": 1700}, n=FEW,
         note="foolbox Boundary runs steps (1.1 queries each) after its own start search; both counted"),
    Spec("brendel-bethge", "min", "l2", {"steps": 100, "lr": 0.01}, n=SOME,
         note="foolbox gets lr / batch size (its trust region scales with the batch, see peers.py)"),
    Spec("brendel-bethge", "min", "linf", {"steps": 100, "lr": 0.01}, n=SOME,
         note="foolbox gets lr / batch size (its trust region scales with the batch, see peers.py)"),
    Spec("brendel-bethge", "min", "l1", {"steps": 100, "lr": 0.01}, n=SOME),
    Spec("brendel-bethge", "min", "l0", {"steps": 100, "lr": 0.01}, n=SOME),
    Spec("onepixel", "sparse", "linf", {"pixels": 1, "steps": 10, "popsize": 30}, n=SOME),
    Spec("pixle", "sparse", "linf", {"restarts": 10, "iterations": 10, "x_dimensions": [2, 10], "y_dimensions": [2, 10]},
         n=SOME),
    Spec("spatial-grid", "spatial", None, {"angles": 31, "shifts": 5},
         kind_args={"mnist": {"max_angle": 30, "max_shift": 3}, "cifar10": {"max_angle": 30, "max_shift": 3}}),
    Spec("spatial-fo", "spatial", None, {"steps": 20},
         kind_args={"mnist": {"max_angle": 30, "max_shift": 3}, "cifar10": {"max_angle": 30, "max_shift": 3}}),
    Spec("uap", "universal", None, {"epochs": 5, "batch_size": 32},
         {"attacker": "fgsm"},
         kind_args={"mnist": {"base_norm": "linf", "eps": 0.2}, "cifar10": {"base_norm": "linf", "eps": 8 / 255}},
         n={"mnist": 200, "cifar10": 100}, note=f"fitted on the first {FIT} training images"),
    Spec("patch", "patch", None, {"epochs": 5, "batch_size": 32, "lr": 0.05, "stride": 2},
         kind_args={"mnist": {"size": 8}, "cifar10": {"size": 8}},
         n={"mnist": 200, "cifar10": 100}, fits=3,
         note=f"fitted on the first {FIT} training images, 3 fits (seeds) per tool; robust accuracy: their mean"),
    Spec("fgsm", "fixed", "linf"),
    Spec("bim", "fixed", "linf", {"steps": 10}),
    Spec("pgd", "fixed", "linf", {"steps": 20}),
    Spec("mifgsm", "fixed", "linf", {"steps": 10}),
    Spec("apgd-ce", "fixed", "linf", {"steps": 20}),
    Spec("apgd-dlr", "fixed", "linf", {"steps": 20}),
    Spec("apgd-t", "fixed", "linf", {"steps": 10, "n_target_classes": 9}),
    Spec("square", "fixed", "linf", {"queries": 300}),
    Spec("fab", "fixed", "linf", {"steps": 20}),
    Spec("fab-t", "fixed", "linf", {"steps": 10, "n_target_classes": 9}),
    Spec("fab-min", "min", "l2", {"steps": 20}),
    Spec("deepfool", "min", "l2", {}),
    Spec("cw", "min", "l2", {"binary_steps": 5, "steps": 50, "lr": 0.01, "initial_const": 1e-3}),
    Spec("ead", "min", "l1", {"binary_steps": 5, "steps": 50, "lr": 0.01, "initial_const": 1e-3, "beta": 1e-3}),
    Spec("spsa", "fixed", "linf", {"steps": 10, "samples": 32}, n=SOME),
    Spec("hopskipjump", "min", "l2", {"queries": 1000}, {"steps": 5}, n=FEW,
         note="foolbox HSJ runs iterations, not queries: 5 iterations are ~1000 queries; both counted"),
    Spec("fmn", "min", "l2", {"steps": 100}),
    Spec("fmn", "min", "linf", {"steps": 100}),
    Spec("fmn", "min", "l1", {"steps": 100}),
    Spec("ddn", "min", "l2", {"steps": 100}),
    Spec("jsma", "min", "l0", {}, n=SOME, eps={"mnist": 78, "cifar10": 307},
         note="the L0 budget of torchattacks' default gamma 0.1: 10% of the input's values (pixels for robustlab); robustlab at its default n_target_classes 9; ART and torchattacks: theta 1, gamma 0.1"),
]
FIT_IMAGES = FIT


# ---------------------------------------------------------------------- one cell


def _threat(spec: Spec, dataset: str):
    if spec.mode == "spatial":
        return SpatialThreat(**spec.kind_args[dataset])
    if spec.mode == "patch":
        return PatchThreat(**spec.kind_args[dataset])
    if spec.mode == "universal":
        return UniversalThreat(**spec.kind_args[dataset])
    if spec.mode == "sparse":
        return ThreatModel("linf", 1.0)
    eps = EPS.get(spec.norm, {}).get(dataset, 1.0) if spec.mode == "fixed" else spec.eps.get(dataset, 1.0)
    return ThreatModel(spec.norm, eps)


class Counted(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images = model, 0
        self.eval()

    def forward(self, x):
        self.images += x.shape[0]
        return self.model(x)


def _judge(spec: Spec, threat, model, x, y, x_adv, peer: bool = False) -> dict:
    """Per-point outcome of one tool: broken (bool) and distance (inf where not broken). A peer's
    all-zero image where the clean one is not counts as a failure: foolbox's CW returns a black
    image for the points it never broke (its placeholder, not an attack's result)."""
    x_adv = x_adv.detach().to(x.dtype)
    in_box = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1) & torch.isfinite(x_adv.flatten(1)).all(dim=1)
    wrong = (predict(model, x_adv) != y) & in_box
    if peer and spec.mode == "min":
        wrong &= ~((x_adv == 0).flatten(1).all(dim=1) & (x != 0).flatten(1).any(dim=1))
    if spec.mode == "fixed":
        wrong &= threat.contains(x_adv, x, tol=1e-5)
    if spec.mode == "sparse" and spec.attack == "onepixel":
        changed = ((x_adv - x).abs() > 1e-6).any(dim=1).flatten(1).sum(dim=1)
        wrong &= changed <= spec.params["pixels"]
    dist = threat.distance(x_adv, x) if isinstance(threat, ThreatModel) else torch.zeros(len(y))
    return {"broken": wrong, "dist": torch.where(wrong, dist, torch.full_like(dist, math.inf))}


def _run_ours(spec: Spec, threat, model, x, y, seed) -> tuple[dict, dict]:
    attack = create_attack(spec.attack, threat, **spec.params)
    clock = ModelClock(model).eval()
    counted = Counted(clock)
    t0, c0 = time.perf_counter(), time.process_time()
    with robustlab_runtime(model, x):
        res = attack.run(counted, x, y, make_generator(seed))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = _judge(spec, threat, model, x, y, res.x_adv)
    if spec.mode == "spatial":
        out["broken"] &= threat.verify(res.x_adv, x, res.params)
    info = {"seconds": wall, "floor": cpu / max(clock.seconds, 1e-9), "queries": counted.images / len(y),
            "gradient": attack.kind == "white-box"}
    return out, info


def _eval_universal(model, threat, delta, x, y) -> dict:
    if threat.distance(delta.unsqueeze(0), torch.zeros_like(delta).unsqueeze(0))[0] > threat.eps * (1 + 1e-5) + 1e-6:
        delta = threat.project_delta(delta)  # the peer's perturbation, held to the same ball
    return _judge(Spec("uap", "fixed"), threat.ball, model, x, y, threat.apply(x, delta))


def _eval_patch(model, threat, patch, x, y) -> dict:
    placer = create_attack("patch", threat, stride=2, locations="worst")
    res = placer.place(model, x, y, patch.to(x.dtype).clamp(0, 1))
    ok = threat.contains(res.x_adv, x)
    broken = (predict(model, res.x_adv) != y) & ok
    return {"broken": broken, "dist": torch.where(broken, 0.0, math.inf)}


def _add_fit(tools: dict, tool: str, out: dict) -> None:
    """Record one fit of a universal/patch tool: ``broken`` of the first fit, the robust accuracy of
    every fit in ``fits``, the seconds added up."""
    acc = 100.0 * (1 - float(out["broken"].float().mean())) if len(out["broken"]) else math.nan
    if tool not in tools:
        tools[tool] = {**out, "fits": [acc]}
        return
    tools[tool]["fits"].append(acc)
    tools[tool]["seconds"] += out["seconds"]


def run_cell(spec: Spec, model_key: str, scale: float, seed: int) -> dict:
    cell: dict[str, Any] = {"spec": spec, "model": model_key, "tools": {}, "errors": {}}
    if spec.attack not in ATTACKS.names():
        cell["verdict"] = "not in this build"
        return cell
    peers = PEERS.get(spec.attack, {})
    if not peers:
        cell["verdict"] = "no peer"
        return cell
    try:
        create_attack(spec.attack, _threat(spec, "mnist"), **spec.params)
    except RobustlabError as exc:  # e.g. a norm this build's attack (or threat model) does not have
        cell["verdict"] = f"not in this build ({exc})"[:60]
        return cell
    model, card = get_model(model_key)
    dataset = card["dataset"]
    threat = _threat(spec, dataset)
    n = max(2, int(round(spec.n[dataset] * scale)))
    x_all, y_all = load_split(dataset, "test")
    x, y = x_all[:n].contiguous(), y_all[:n].contiguous()
    correct = predict(model, x) == y
    cell["n"], cell["clean"] = n, float(correct.float().mean())
    if spec.mode not in ("universal", "patch"):
        x, y = x[correct].contiguous(), y[correct].contiguous()
    cell["attacked"] = len(y)
    row = Row(spec.attack, spec.mode, spec.params, threat, seed, tuple(x.shape[1:]), 10, spec.peer_params)
    log(f"[{model_key}] {spec.attack} {spec.norm or threat}: {len(y)} images")
    if spec.mode in ("universal", "patch"):
        fx, fy = load_split(dataset, "train")
        fx, fy = fx[:FIT_IMAGES].contiguous(), fy[:FIT_IMAGES].contiguous()
        evaluate = _eval_universal if spec.mode == "universal" else _eval_patch
        keep = correct
        # One perturbation per fit: the points are not independent draws, the fits are. Each tool
        # fits spec.fits times (seeds seed, seed + 1, ...); the verdict compares the fits.
        for k in range(spec.fits):
            attack = create_attack(spec.attack, threat, **spec.params)
            clock = ModelClock(model).eval()
            t0, c0 = time.perf_counter(), time.process_time()
            with robustlab_runtime(model, fx):
                fitted = attack.fit(clock, fx, fy, make_generator(seed + k))[0]
            ours_s = time.perf_counter() - t0
            floor = (time.process_time() - c0) / max(clock.seconds, 1e-9)
            out = evaluate(model, threat, fitted, x[keep], y[keep])
            _add_fit(cell["tools"], "robustlab", {**out, "seconds": ours_s, "floor": floor, "queries": math.nan,
                                                  "gradient": True})
            fit_row = Row(spec.attack, spec.mode, spec.params, threat, seed + k, tuple(x.shape[1:]), 10,
                          spec.peer_params)
            for peer in peers:
                if peer in cell["errors"]:
                    continue
                try:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        theirs = build_peer(peer, model, fit_row)(fx, fy)
                    secs = time.perf_counter() - t0
                    _add_fit(cell["tools"], peer, {**evaluate(model, threat, theirs, x[keep], y[keep]), "seconds": secs})
                except Exception as exc:  # a peer that fails is reported, not fatal
                    cell["errors"][peer] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                    log(traceback.format_exc())
        cell["attacked"] = int(keep.sum())
    else:
        out, info = _run_ours(spec, threat, model, x, y, seed)
        cell["tools"]["robustlab"] = {**out, **info}
        for peer in peers:
            try:
                counted = Counted(model)
                fn = build_peer(peer, counted, row)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x_adv = fn(x, y)
                secs = time.perf_counter() - t0
                cell["tools"][peer] = {**_judge(spec, threat, model, x, y, x_adv, peer=True), "seconds": secs,
                                       "queries": counted.images / max(1, len(y))}
            except Exception as exc:
                cell["errors"][peer] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                log(traceback.format_exc())
    cell["verdict"] = verdict(cell)
    return cell


def verdict(cell: dict) -> str:
    tools = cell["tools"]
    ours = tools["robustlab"]
    verdicts = []
    for peer, theirs in tools.items():
        if peer == "robustlab":
            continue
        if cell["spec"].mode == "min":
            a, b = median(ours["dist"]), median(theirs["dist"])
            if a <= b * (1 + NORM_SLACK) or (math.isinf(b) and math.isinf(a)):
                verdicts.append("PASS")
                continue
            # Paired per point, as for robust accuracy: the points where the peer's norm is smaller
            # against those where robustlab's is (a sign test; a few points cannot show a difference).
            only_peer = int((theirs["dist"] * (1 + NORM_SLACK) < ours["dist"]).sum())
            only_ours = int((ours["dist"] * (1 + NORM_SLACK) < theirs["dist"]).sum())
            verdicts.append("NOISE" if sign_test(only_peer, only_ours) >= 0.05 else "FAIL")
        elif "fits" in ours and len(ours["fits"]) > 1:
            verdicts.append(_fits_verdict(ours["fits"], theirs["fits"]))
        else:
            n = len(ours["broken"])
            gap = 100.0 * (int(theirs["broken"].sum()) - int(ours["broken"].sum())) / max(n, 1)
            only_peer = int((theirs["broken"] & ~ours["broken"]).sum())
            only_ours = int((ours["broken"] & ~theirs["broken"]).sum())
            verdicts.append(fidelity_status(gap, ACC_SLACK, only_peer, only_ours)[0])
    if not verdicts:
        return "ERROR (peer failed)" if cell["errors"] else "no peer"
    for v in ("FAIL", "NOISE", "PASS"):
        if v in verdicts:
            return v
    return verdicts[0]


def _fits_verdict(ours: list[float], theirs: list[float]) -> str:
    """Robust accuracies of several fits per tool: PASS if robustlab's mean is at most ACC_SLACK
    points above the peer's; above, NOISE unless a one-sided Welch t-test says robustlab's fits leave
    more points robust (p < 0.05), else FAIL."""
    import statistics

    from scipy.stats import ttest_ind

    if statistics.fmean(ours) <= statistics.fmean(theirs) + ACC_SLACK:
        return "PASS"
    if statistics.pstdev(ours) == 0 and statistics.pstdev(theirs) == 0:
        return "FAIL"
    p = float(ttest_ind(ours, theirs, equal_var=False, alternative="greater").pvalue)
    return "NOISE" if p >= 0.05 else "FAIL"


# ---------------------------------------------------------------------- report


def _metric(cell: dict, tool: str) -> str:
    t = cell["tools"].get(tool)
    if t is None:
        return cell["errors"].get(tool, "-")[:40] if tool in cell["errors"] else "-"
    if cell["spec"].mode == "min":
        m = median(t["dist"])
        return f"med {m:.4g}" + (f" ({int(t['broken'].sum())}/{len(t['broken'])})" if not t["broken"].all() else "")
    if len(t.get("fits", ())) > 1:
        return f"{sum(t['fits']) / len(t['fits']):.1f}% (" + "/".join(f"{a:.1f}" for a in t["fits"]) + ")"
    n = len(t["broken"])
    return f"{100.0 * (1 - float(t['broken'].float().mean())) if n else math.nan:.1f}%"


def format_report(cells: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines: list[str] = []
    out = lines.append
    out("robustlab fidelity matrix: every registered attack against its peer implementation(s)")
    out("=" * 118)
    out(f"machine: {environment()}")
    out(f"run: seed {args.seed}, scale {args.scale}, models {', '.join(args.models)}, {wall / 60:.1f} min in all")
    out("metric: robust accuracy of the attacked points (fixed, sparse, spatial, universal, patch; lower is a")
    out("stronger attack) or median norm found (min; lower is better, failures count as infinite).")
    out("verdict: PASS / NOISE (gap not significant, sign test) / FAIL / not in this build / no peer.")
    out("floor: robustlab's process CPU time over the time inside the model (forward + backward); gradient rows.")
    out("")
    head = f"{'attack':<15}{'norm':<11}{'model':<10}{'pts':>4}  {'robustlab':<16}{'peer':<13}{'peer value':<16}" \
           f"{'time ours/peer':>15}{'floor':>7}  verdict"
    out(head)
    out("-" * len(head))
    for c in cells:
        spec = c["spec"]
        norm = spec.norm or spec.mode
        peers = [p for p in PEERS.get(spec.attack, {})] or ["-"]
        if "tools" not in c or not c["tools"]:
            out(f"{spec.attack:<15}{norm:<11}{c['model']:<10}{'':>4}  {'':<16}{', '.join(peers):<13}{'':<16}{'':>15}"
                f"{'':>7}  {c['verdict']}")
            continue
        ours = c["tools"]["robustlab"]
        for i, peer in enumerate(peers):
            theirs = c["tools"].get(peer)
            ratio = f"{ours['seconds']:.1f}/{theirs['seconds']:.1f}s" if theirs else f"{ours['seconds']:.1f}s/-"
            floor = f"{ours['floor']:.2f}x" if ours.get("gradient") and math.isfinite(ours.get("floor", math.nan)) else ""
            first = i == 0
            out(f"{spec.attack if first else '':<15}{norm if first else '':<11}{c['model'] if first else '':<10}"
                f"{c['attacked'] if first else '':>4}  {_metric(c, 'robustlab') if first else '':<16}{peer:<13}"
                f"{_metric(c, peer):<16}{ratio:>15}{floor if first else '':>7}  {c['verdict'] if first else ''}")
    out("")
    out("Rows (budgets both tools got; images: first n test images, correctly classified ones attacked):")
    seen = set()
    for c in cells:
        spec = c["spec"]
        key = (spec.attack, spec.norm)
        if key in seen:
            continue
        seen.add(key)
        extra = f"; peer: {spec.peer_params}" if spec.peer_params else ""
        note = f"; {spec.note}" if spec.note else ""
        out(f"  {spec.attack} ({spec.mode}, {spec.norm or spec.kind_args.get('mnist')}): {spec.params}{extra}; "
            f"n {spec.n}{note}")
    qrows = [c for c in cells if c.get("tools") and c["spec"].attack in ("boundary", "hopskipjump")]
    if qrows:
        out("")
        out("Queries per attacked point (decision-based rows):")
        for c in qrows:
            q = ", ".join(f"{k} {v.get('queries', math.nan):.0f}" for k, v in c["tools"].items())
            out(f"  {c['spec'].attack} on {c['model']}: {q}")
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    out("")
    out("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    errors = [(c, p, e) for c in cells for p, e in c.get("errors", {}).items()]
    for c, p, e in errors:
        out(f"peer error: {c['spec'].attack} on {c['model']} ({p}): {e}")
    return "\n".join(lines) + "\n"


def all_specs(only: set[str] | None) -> list[Spec]:
    """ROWS, plus a "no peer" row for every registered attack the table does not list."""
    specs = list(ROWS)
    listed = {s.attack for s in specs}
    for name in ATTACKS.names():
        if name not in listed:
            specs.append(Spec(name, "fixed", "-"))
    return [s for s in specs if not only or s.attack in only or f"{s.attack}:{s.norm}" in only]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated attack names, or attack:norm for one row")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "fidelity_matrix.txt"))
    ap.add_argument("--save-cells", default="", help="also save the raw cells (torch.save) to this file")
    ap.add_argument("--merge", default="", help="comma-separated saved cell files: report them, run nothing")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    set_threads(args.threads)
    only = {s for s in args.only.split(",") if s} or None
    t0 = time.perf_counter()
    cells = []
    if args.merge:
        wall = 0.0
        for path in args.merge.split(","):
            saved = torch.load(path, weights_only=False)  # our own files, written by --save-cells
            cells += saved["cells"]
            wall += saved["wall"]
        keyed = {(c["spec"].attack, c["spec"].norm, c["model"] if c.get("tools") else "*"): c for c in cells}
        cells = sorted(keyed.values(), key=lambda c: (_spec_index(c["spec"]), MODELS.index(c["model"])
                                                     if c["model"] in MODELS else 99))
        args.models = sorted({c["model"] for c in cells if c.get("tools")}, key=lambda m: MODELS.index(m)
                             if m in MODELS else 99)
        write_report(format_report(cells, args, wall), Path(args.out))
        return 0
    for spec in all_specs(only):
        for model_key in args.models:
            cell = run_cell(spec, model_key, args.scale, args.seed)
            cells.append(cell)
            if args.save_cells:  # after every cell: a run cut short keeps what it finished
                torch.save({"cells": cells, "wall": time.perf_counter() - t0}, args.save_cells)
            if not cell["tools"]:
                break  # not run: one line says it for every model
    wall = time.perf_counter() - t0
    if args.save_cells:
        torch.save({"cells": cells, "wall": wall}, args.save_cells)
    write_report(format_report(cells, args, wall), Path(args.out))
    return 0


def _spec_index(spec: Spec) -> int:
    for i, s in enumerate(all_specs(None)):
        if s.attack == spec.attack and s.norm == spec.norm:
            return i
    return 10**6


if __name__ == "__main__":
    sys.exit(main())
