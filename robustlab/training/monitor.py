"""What the loop watches each epoch: clean and PGD accuracy on a held-out set, the best epoch (robust
overfitting, Rice et al. 2020), and catastrophic overfitting of single-step recipes.

Catastrophic overfitting (Wong et al. 2020; Andriushchenko & Flammarion 2020; de Jorge et al. 2022):
within an epoch or two, a model trained on single-step (FGSM) examples loses almost all of its PGD
accuracy while its accuracy on its own training examples keeps rising; it has learned to defeat the
single step, not the threat model. The rule used here (:func:`detect_catastrophic_overfitting`):

    Let ``best`` be the highest validation PGD accuracy of the epochs before epoch e, reached at epoch
    b. Catastrophic overfitting is declared at epoch e when
      1. ``best >= min_best`` (default 0.1): there was robustness to lose, and
      2. PGD accuracy collapsed, suddenly or steadily: ``val_robust_acc[e] < ratio * best`` (default
         ratio 0.3, below 30 % of its best), or it fell in each of the last ``slide`` epochs (default
         3) to below ``slide_ratio * best`` (default 0.5) -- the slower collapse seen with FGSM
         training on MNIST at eps 0.3 (held-out PGD accuracy 17 %, 15 %, 10 %, 6 % over epochs 1-4,
         ``benchmarks/catastrophic_overfitting.py``), and
      3. ``train_acc[e] >= train_acc[b]``: the training accuracy (on the recipe's own adversarial
         examples if it logs them, else on clean examples) did not fall meanwhile, so the collapse is
         not plain divergence of the training.

The loop then stops, restores the best epoch's weights, and records the event in the history.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from robustlab.attacks import create_attack
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.models.runtime import eval_mode, fast_runtime
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel

VAL_KEY = 0x5641  # seeding key of the validation attack's generators ("VA")


def split_holdout(data: Dataset, n: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out): ``n`` examples drawn at random (from ``seed``) are held out."""
    if not 0 < n < len(data):
        raise RobustlabError(f"cannot hold out {n} of {len(data)} training examples for validation")
    order = torch.randperm(len(data), generator=make_generator(seed, VAL_KEY))
    return data.take(order[n:].sort().values), data.take(order[:n].sort().values)


def robust_validation(
    model: nn.Module,
    data: Dataset,
    threat: ThreatModel | None,
    steps: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Clean accuracy and, if ``threat`` is given, PGD accuracy (``steps`` steps of 2.5 eps / steps,
    random start, CE) on ``data``: the fraction classified correctly and not broken (per-pixel labels:
    the mean pixel accuracy of the clean and of the PGD images, per-pixel CE averaged). Only correctly
    classified points are attacked. The attack's random starts are the same at every call (same
    seed), so epoch-to-epoch differences are the model's. Eval mode and the CPU speed context
    (:func:`robustlab.models.runtime.fast_runtime`, as in an evaluation); the caller's modes and
    tensors restored."""
    device = torch.device(device)
    attack = create_attack("pgd", threat, steps=steps) if threat is not None and threat.eps > 0 else None
    clean = robust = 0
    probe_x = data.batch(range(min(len(data), batch_size)))[0].to(device)
    with eval_mode(model), fast_runtime(model, probe_x):
        for b, _, x, y in data.batches(batch_size):
            x, y = x.to(device), y.to(device)
            if y.dim() > 1:  # per-pixel labels: pixel accuracy, clean and on PGD examples of every sample
                with torch.no_grad():
                    clean += float((model(x).argmax(dim=1) == y).flatten(1).float().mean(dim=1).sum())
                if attack is not None:
                    x_adv = attack.run(model, x, y, make_generator(seed, VAL_KEY, b, device=device)).x_adv
                    with torch.no_grad():
                        robust += float((model(x_adv).argmax(dim=1) == y).flatten(1).float().mean(dim=1).sum())
                continue
            with torch.no_grad():
                correct = model(x).argmax(dim=1) == y
            clean += int(correct.sum())
            if attack is None:  # no threat model, or eps 0: robust accuracy is clean accuracy
                robust += int(correct.sum())
                continue
            if not bool(correct.any()):
                continue
            idx = correct.nonzero(as_tuple=True)[0]
            result = attack.run(model, x[idx], y[idx], make_generator(seed, VAL_KEY, b, device=device))
            robust += int((~result.success).sum())
    out = {"clean_acc": clean / len(data)}
    if threat is not None:
        out["robust_acc"] = robust / len(data)
    return out


def train_accuracy(record: dict[str, Any]) -> float | None:
    """The training accuracy the overfitting rule compares: on the recipe's adversarial examples if
    it logs them (``train_adv_acc``), else on clean examples (``train_clean_acc``)."""
    for key in ("train_adv_acc", "train_clean_acc"):
        if record.get(key) is not None:
            return float(record[key])
    return None


def detect_catastrophic_overfitting(
    history: Sequence[dict[str, Any]], ratio: float = 0.3, min_best: float = 0.1, slide: int = 3,
    slide_ratio: float = 0.5,
) -> dict[str, Any] | None:
    """Apply the rule of this module's docstring to the last epoch of ``history`` (records with
    ``epoch``, ``val_robust_acc`` and ``train_adv_acc`` or ``train_clean_acc``). Returns a description
    (epoch, best epoch, accuracies, message) if catastrophic overfitting is declared, else None."""
    if len(history) < 2:
        return None
    last = history[-1]
    now = last.get("val_robust_acc")
    earlier = [r for r in history[:-1] if r.get("val_robust_acc") is not None]
    if now is None or not earlier:
        return None
    best = max(earlier, key=lambda r: r["val_robust_acc"])  # first epoch reaching the maximum
    best_acc = float(best["val_robust_acc"])
    recent = [r.get("val_robust_acc") for r in history[-(slide + 1):]]
    sliding = (
        len(recent) == slide + 1 and all(v is not None for v in recent)
        and all(b < a for a, b in zip(recent, recent[1:])) and float(now) < slide_ratio * best_acc
    )
    if best_acc < min_best or not (float(now) < ratio * best_acc or sliding):
        return None
    train_now, train_best = train_accuracy(last), train_accuracy(best)
    if train_now is None or train_best is None or train_now < train_best:
        return None
    return {
        "epoch": last["epoch"],
        "best_epoch": best["epoch"],
        "val_robust_acc": float(now),
        "best_val_robust_acc": best_acc,
        "train_acc": train_now,
        "best_train_acc": train_best,
        "message": (
            f"catastrophic overfitting at epoch {last['epoch']}: PGD accuracy on the held-out set fell"
            f"{f' in each of the last {slide} epochs' if sliding else ''} to "
            f"{100 * float(now):.1f}% from {100 * best_acc:.1f}% (epoch {best['epoch']}) while training accuracy "
            f"rose to {100 * train_now:.1f}%; stopped and restored epoch {best['epoch']}. Single-step training "
            f"overfitted to its own attack: use the n-fgsm recipe (de Jorge et al. 2022), a smaller step or eps, "
            f"or a multi-step recipe"
        ),
    }
