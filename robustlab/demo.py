"""``robustlab demo``: the main job end to end on the embedded digits, in well under two minutes.

Trains a small CNN on scikit-learn's digits, saves it with its model card, evaluates it under FGSM
and PGD (Linf) over an epsilon grid with the sanity checks, and writes the results store and the
HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from robustlab.attacks import create_attack
from robustlab.report.html import write_report
from robustlab.eval.runner import EvalOptions, evaluate
from robustlab.eval.store import ResultsStore
from robustlab.data import load_dataset
from robustlab.models import ModelCard, create_model, save_checkpoint
from robustlab.models.checkpoint import read_card
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, accuracy, train

ARCHITECTURE = "digits_cnn"
EPS = 0.1
EPS_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def run_demo(out: Path, device: torch.device | str = "cpu", log=print, *, epochs: int = 15,
             n: int | None = None) -> dict[str, Path]:
    """Train (``epochs``), evaluate, report; ``n`` keeps only the first n images of each split (a
    quick check; default all). Returns the paths of the checkpoint, results store and report."""
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = load_dataset("digits", "train"), load_dataset("digits", "test")
    if n is not None:
        train_data, test_data = train_data.subset(n), test_data.subset(n)
    torch.manual_seed(0)
    model = create_model(ARCHITECTURE, num_classes=train_data.num_classes)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=0)
    t0 = time.perf_counter()
    history = train(model, train_data, config, device=device)
    clean = accuracy(model, test_data, device=torch.device(device))
    log(f"trained {ARCHITECTURE} on digits ({len(train_data)} images) in {time.perf_counter() - t0:.1f}s: "
        f"clean test accuracy {100 * clean:.2f}%")
    card = ModelCard.for_architecture(
        ARCHITECTURE, num_classes=train_data.num_classes, dataset="digits:train",
        training={"recipe": "standard", **config.to_dict(), "final_loss": history[-1]["loss"]},
        clean_accuracy=clean,
    )
    checkpoint = save_checkpoint(model.cpu(), out / f"{ARCHITECTURE}.safetensors", card)
    card = read_card(checkpoint)  # as saved: with the weights' sha256
    model.to(device)
    threat = ThreatModel("linf", EPS)
    attacks = [create_attack("fgsm", threat), create_attack("pgd", threat, steps=20)]
    db = out / "results.db"
    with ResultsStore(db) as store:
        result = evaluate(
            model, test_data, attacks, store, model_name=str(checkpoint),
            model_info={"source": "checkpoint", "card": card.to_dict()},
            options=EvalOptions(eps_grid=EPS_GRID, seed=0, extra={"classes": list(test_data.classes)}),
            device=device,
        )
        write_report(store, result.run_id, out)
    s = result.summary
    log(f"{threat}: clean {100 * s['clean_accuracy']:.2f}%, after FGSM {100 * s['attacks'][0]['robust_accuracy']:.2f}%, "
        f"after PGD-20 {100 * s['robust_accuracy']:.2f}%")
    for c in result.checks:
        log(f"  [{c['status']}] {c['name']}: {c['detail']}")
    return {"checkpoint": checkpoint, "db": db, "report": out / "report.html"}
