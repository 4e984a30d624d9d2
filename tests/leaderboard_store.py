"""Runs for leaderboard tests, written through the store's API (no evaluation runs).

``add_run`` writes one complete adversarial run: the config as the runner records it (attacks,
threat, model hash, defenses), per-sample rows where the first ``clean`` samples are classified
correctly and the first ``robust`` of them stay robust, and the summary the adversarial protocol
computes from those rows (``fast=True``: a summary written directly, no rows; for large stores).
"""

from __future__ import annotations

from typing import Any

from robustlab.attacks.suites import SUITES
from robustlab.eval.protocols import AdversarialProtocol
from robustlab.eval.store import ResultsStore, SampleRow
from robustlab.threat import ThreatModel

ENV = {"python": "3.11", "torch": "2.14.1", "robustlab": "test", "numpy": "2", "device": "cpu", "threads": 1,
       "platform": "linux"}


def attack_configs(spec: str | list[dict[str, Any]], norm: str, eps: float) -> list[dict[str, Any]]:
    """A suite's attack configs (``standard``, ``rand``) or the given list."""
    if isinstance(spec, str):
        return [a.config() for a in SUITES.get(spec)(ThreatModel(norm, eps))]
    return spec


def add_run(store: ResultsStore, model: str = "net", *, sha: str | None = None, attacks: Any = "standard",
            n: int = 20, clean: int = 16, robust: int = 8, dataset: str = "cifar10", split: str = "test",
            norm: str = "linf", eps: float = 8 / 255, defenses: list[dict[str, Any]] | None = None,
            declared: dict[str, Any] | None = None, randomized: bool = False, checks: list[dict] | None = None,
            fast: bool = False, extra: dict[str, Any] | None = None, adaptive: bool = True) -> str:
    configs = attack_configs(attacks, norm, eps)
    config = {"model": model, "model_sha256": sha, "dataset": dataset, "split": split, "n": n, "seed": 0,
              "batch_size": 128, "norm": norm, "eps": eps, "attacks": configs, "eps_grid": [], "steps_grid": [],
              "sanity": False, "classes": [str(i) for i in range(10)]}
    config.update(extra or {})
    if defenses:
        config["defenses"] = defenses
    if declared:
        config["declared_strength"] = declared
    card = {"sha256": sha, "architecture": "resnet18", "source": "external"} if sha else None
    info = {"card": card, "source": "checkpoint" if sha else "registry", "randomized": randomized}
    if defenses and adaptive:  # as evaluate() records a defended model attacked adaptively
        info.update(defenses=defenses, adaptive_attack="BPDA through " + "+".join(d["name"] for d in defenses))
    records = [{"name": a["name"], "params": a["params"], "targeted": False} for a in configs]
    run_id = store.create_run("adversarial", config, ENV, info, records)
    store.add_task(run_id, "main", "main", n, {"eps": eps, "steps": None})
    if fast:
        summary = {"run_id": run_id, "protocol": "adversarial", "model": model, "dataset": dataset, "split": split,
                   "n": n, "threat": {"norm": norm, "eps": eps}, "clean_accuracy": clean / n,
                   "robust_accuracy": robust / n, "ensemble_robust_accuracy": robust / n, "attacks": [],
                   "eps_curve": [{"eps": 0.0, "robust_accuracy": clean / n}, {"eps": eps, "robust_accuracy": robust / n}],
                   "steps_curve": None, "min_norm": None, "rejected": 0, "seconds": 1.0}
        store.finish_run(run_id, summary, checks or [])
        return run_id
    rows = []
    for s in range(n):
        correct, stays = s < clean, s < robust
        broken = correct and not stays
        rows.append(SampleRow(s, s % 10, s % 10 if correct else (s + 1) % 10, correct, stays, 0 if broken else None,
                              (s + 2) % 10 if broken else None, eps if broken else None, 10, 10))
    store.write_batch(run_id, "main", 0, rows, [{"seconds": 0.5, "gradients": 10, "forwards": 10} for _ in configs])
    run = store.get_run(run_id)
    summary = AdversarialProtocol.summarize(store, {**run, "status": "complete"}, [])
    store.finish_run(run_id, summary, checks or [])
    return run_id
