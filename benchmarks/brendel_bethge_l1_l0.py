"""Brendel-Bethge in L1 and L0: robustlab against foolbox's L1BrendelBethgeAttack and
L0BrendelBethgeAttack, side by side, from the same starting points.

Models: the digits CNN (robustlab's embedded 8x8 digits, trained as the tests train it: 8 epochs)
and a linear softmax classifier on the same data, where the smallest L1 and L0 perturbations are
known exactly (tests/test_attacks_catalogue_c.py computes them; printed as "exact"). Points: the
first N correctly classified digits test images (linear: training images, as in the test).

Both tools get the same budget (steps, lr; foolbox's lr divided by the batch size, since foolbox 3
sizes its trust region by the whole batch, see benchmarks/peers.py) and the same starting points:
robustlab's blended-noise start (``blended_start`` with the seed the attack itself uses), handed to
foolbox as ``starting_points``. A point counts only if the returned image is misclassified.
Printed: median norm (L1: sum of absolute changes; L0: changed pixels), the points where each tool's
norm is smaller, and process CPU seconds.

Usage: python benchmarks/brendel_bethge_l1_l0.py [--n 10] [--steps 100] [--lr 0.01]
Writes benchmarks/results/brendel_bethge_l1_l0.txt. foolbox (and numba, which its BB needs) are
benchmark-only peers: pip install foolbox numba.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import RESULTS, environment, log, set_threads, write_report
from benchmarks.peers import median
from robustlab.attacks import create_attack
from robustlab.attacks.hopskipjump import _LabelOracle, blended_start
from robustlab.data import load_dataset
from robustlab.models import create_model
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, train


def digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    train(model, load_dataset("digits", "train"), TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0), progress=False)
    return model.eval()


def linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = load_dataset("digits", "train")
    x, y = data.x.double(), data.y
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def first_correct(model, x, y, n):
    with torch.no_grad():
        ok = (model(x.to(next(model.parameters()).dtype)).argmax(1) == y).nonzero()[:n, 0]
    return x[ok].to(next(model.parameters()).dtype).contiguous(), y[ok].contiguous()


def judged(model, threat, x, y, x_adv):
    with torch.no_grad():
        broken = model(x_adv.to(x.dtype)).argmax(1) != y
    dist = threat.distance(x_adv.to(x.dtype), x)
    return torch.where(broken, dist, torch.full_like(dist, float("inf")))


def compare(name, model, x, y, norm, steps, lr, exact=None):
    import foolbox as fb

    threat = ThreatModel(norm, 1.0)
    attack = create_attack("brendel-bethge", threat, steps=steps, lr=lr)
    c0 = time.process_time()
    res = attack.run(model, x, y, make_generator(0))
    ours_cpu = time.process_time() - c0
    ours = judged(model, threat, x, y, res.x_adv)
    # The same starting points: robustlab's start, drawn with the generator its run used.
    _, rows, start = blended_start(attack, _LabelOracle(attack, model, y, 1 << 62), x, make_generator(0),
                                   attack.params["init_trials"])
    starts = x.clone()
    starts[rows] = start
    cls = {"l1": fb.attacks.L1BrendelBethgeAttack, "l0": fb.attacks.L0BrendelBethgeAttack}[norm]
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    c0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, adv, _ = cls(steps=steps, lr=lr / len(x))(fmodel, x, y, epsilons=None, starting_points=starts)
    fb_cpu = time.process_time() - c0
    theirs = judged(model, threat, x, y, adv)
    wins = int((ours < theirs * (1 - 1e-3)).sum()), int((theirs < ours * (1 - 1e-3)).sum())
    line = (f"{name:<12}{norm:<4}{len(y):>4}  robustlab {median(ours):>8.4g} ({int(torch.isfinite(ours).sum())} broken)  "
            f"foolbox {median(theirs):>8.4g} ({int(torch.isfinite(theirs).sum())} broken)  "
            f"smaller: robustlab {wins[0]}, foolbox {wins[1]}  CPU {ours_cpu:.1f}/{fb_cpu:.1f}s")
    if exact is not None:
        line += f"  exact {median(exact):.4g}"
    log(line)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    set_threads(1)
    from test_attacks_catalogue_c import _exact_minimum

    test = load_dataset("digits", "test")
    lines = ["Brendel-Bethge L1 and L0: robustlab vs foolbox 3 (L1/L0BrendelBethgeAttack), same starting points",
             f"machine: {environment()}",
             (f"budget: {args.steps} steps, lr {args.lr} (foolbox: lr / batch size); first {args.n} correctly "
              "classified points; median norm (L1: sum |change|; L0: changed pixels), failures count as infinite"),
             ""]
    cnn = digits_cnn()
    x, y = first_correct(cnn, test.x, test.y, args.n)
    for norm in ("l1", "l0"):
        lines.append(compare("digits-cnn", cnn, x, y, norm, args.steps, args.lr))
    lin = linear()
    train_set = load_dataset("digits", "train")
    x, y = first_correct(lin, train_set.x, train_set.y, args.n)
    for norm in ("l1", "l0"):
        lines.append(compare("linear", lin, x, y, norm, args.steps, args.lr, _exact_minimum(lin, x, y, norm)))
    write_report("\n".join(lines) + "\n", RESULTS / "brendel_bethge_l1_l0.txt")


if __name__ == "__main__":
    main()
