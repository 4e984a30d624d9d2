"""The ``rand`` ensemble (AutoAttack's version for randomized defenses: APGD-CE and APGD-DLR, EOT
over 20 draws, one restart, 100 steps) against the reference on a randomized defense, side by side.

The reference is AutoAttack's ``version='rand'`` built from torchattacks' components as fra31/auto-attack
sets it (``APGD(loss='ce')`` then ``APGD(loss='dlr')``, 100 steps, ``eot_iter=20``, one restart, the
second on what the first left robust): fra31/auto-attack itself is not on PyPI (it installs from git
only). ``torchattacks.AutoAttack(version='rand')`` is shown too: it leaves APGD at torchattacks' default
of 10 steps, not AutoAttack's 100. All
attack the same defended model (the MNIST standard model behind Gaussian noise, sigma 0.3, whose
prediction is the majority vote over 8 draws), and every adversarial example of both is judged by that
same vote, with one fixed generator. Beside them, single-draw APGD-CE (what ``standard``'s first member
does on a randomized model without EOT) shows what the EOT buys.

    python benchmarks/rand_vs_autoattack.py [--n 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, get_model, load_split, log, set_threads, write_report  # noqa: E402

from robustlab.attacks import build_attacks, create_attack  # noqa: E402
from robustlab.attacks.ensemble import WorstCaseEnsemble  # noqa: E402
from robustlab.defenses import apply_defenses  # noqa: E402
from robustlab.threat import ThreatModel  # noqa: E402

EPS, DEFENSE = 0.3, "noise:sigma=0.3,draws=8"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    set_threads(1)
    import torchattacks

    model, _ = get_model("mnist_std")
    x, y = load_split("mnist", "test")
    x, y = x[: args.n], y[: args.n]
    defended = apply_defenses(model, [DEFENSE])
    threat = ThreatModel("linf", EPS)

    def judge(x_adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return defended.predict(x_adv, torch.Generator().manual_seed(12345)) == y

    clean = judge(x)
    rows = []

    def ours(label, attacks):
        defended.set_generator(torch.Generator().manual_seed(1))
        t0 = time.process_time()
        x_adv = WorstCaseEnsemble(attacks).run(defended, x, y, torch.Generator().manual_seed(0)).x_adv
        return label, judge(x_adv) & clean, time.process_time() - t0

    rows.append(ours("robustlab APGD-CE, one draw per step", [create_attack("apgd-ce", threat, steps=100)]))
    log(f"{rows[-1][0]}: {int(rows[-1][1].sum())}")
    rows.append(ours("robustlab rand (APGD-CE + APGD-DLR, EOT 20)", build_attacks(["rand"], threat)))
    log(f"{rows[-1][0]}: {int(rows[-1][1].sum())}")
    defended.set_generator(None)  # the reference draws from the global generator, as it would in its own use
    torch.manual_seed(1)
    t0 = time.process_time()
    ref = torchattacks.MultiAttack([
        torchattacks.APGD(defended, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss=loss, eot_iter=20, seed=0)
        for loss in ("ce", "dlr")])
    rows.append(("reference: torchattacks APGD-CE + APGD-DLR, 100 steps, eot_iter 20", judge(ref(x, y)) & clean,
                 time.process_time() - t0))
    log(f"{rows[-1][0]}: {int(rows[-1][1].sum())}")
    torch.manual_seed(1)
    t0 = time.process_time()
    port = torchattacks.AutoAttack(defended, norm="Linf", eps=EPS, version="rand", n_classes=10, seed=0)
    rows.append(("torchattacks AutoAttack(version='rand') (its APGD at 10 steps)", judge(port(x, y)) & clean,
                 time.process_time() - t0))
    log(f"{rows[-1][0]}: {int(rows[-1][1].sum())}")
    ours_rand, theirs = rows[1][1], rows[2][1]
    n = args.n
    lines = [
        "# rand ensemble vs AutoAttack's rand version (torchattacks port), side by side", "", environment(), "",
        f"mnist_std behind {DEFENSE}, Linf {EPS}, first {n} MNIST test images; every example judged by the "
        "defended model's vote over 8 draws (one fixed generator)",
        f"clean accuracy of the defended model: {100 * float(clean.float().mean()):.1f}%", "",
        "| attack | robust accuracy | CPU seconds |", "| --- | --- | --- |",
        *[f"| {label} | {100 * float(r.float().mean()):.1f}% | {s:.0f} |" for label, r, s in rows], "",
        f"per sample: robust under both {int((ours_rand & theirs).sum())}, only under robustlab's rand "
        f"{int((ours_rand & ~theirs).sum())}, only under the reference {int((~ours_rand & theirs).sum())}; "
        f"worst case of both {100 * float((ours_rand & theirs).float().mean()):.1f}%",
        f"CPU time ratio robustlab rand / reference: {rows[1][2] / rows[2][2]:.2f}x",
    ]
    write_report("\n".join(lines) + "\n", RESULTS / "rand_vs_autoattack.txt")


if __name__ == "__main__":
    main()
