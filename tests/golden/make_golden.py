"""Writes the golden per-sample record of the adversarial evaluation that tests/test_golden.py holds
the runner to. It was run once with the release before the evaluation core (commit b9ac979):

    PYTHONPATH=/path/to/release python tests/golden/make_golden.py tests/golden

and writes digits_cnn.safetensors (+ .json card), record.json and release_store.db (a results store
in that release's schema, with one complete and one interrupted run, for the migration test).
Never re-run it on a later release: the files are the fixed point of comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from golden_spec import ATTACKS, OPTIONS, N, THREAT, record

try:  # the release's layout, then the current one
    from robustlab.bench.runner import EvalOptions, evaluate
    from robustlab.bench.store import ResultsStore
except ImportError:  # pragma: no cover
    from robustlab.eval.runner import EvalOptions, evaluate
    from robustlab.eval.store import ResultsStore
from robustlab.attacks import create_attack
from robustlab.data import load_dataset
from robustlab.models import create_model, save_checkpoint
from robustlab.models.checkpoint import ModelCard
from robustlab.threat import ThreatModel
from robustlab.training import TrainConfig, train


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    train(model, load_dataset("digits", "train"), TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0), progress=False)
    model.eval()
    card = ModelCard.for_architecture("digits_cnn", num_classes=10, in_channels=1, dataset="digits:train")
    save_checkpoint(model, out / "digits_cnn.safetensors", card)
    data = load_dataset("digits", "test").subset(N)
    threat = ThreatModel(*THREAT)
    attacks = [create_attack(name, threat, **params) for name, params in ATTACKS]
    db = out / "release_store.db"
    db.unlink(missing_ok=True)
    with ResultsStore(db) as store:
        result = evaluate(model, data, attacks, store, model_name="digits_cnn_golden", options=EvalOptions(**OPTIONS))
        rec = record(store, result.run_id, result.summary, result.checks)
        # An interrupted run: the same evaluation killed after its first batch (for resume after migration).
        from robustlab.bench import runner as runner_module

        real, calls = runner_module.attack_batch, []

        def dying(*args, **kwargs):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*args, **kwargs)

        runner_module.attack_batch = dying
        try:
            evaluate(model, data, attacks, store, model_name="digits_cnn_interrupted", options=EvalOptions(**OPTIONS))
        except KeyboardInterrupt:
            pass
        finally:
            runner_module.attack_batch = real
    (out / "record.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
