"""Evaluation: the runner, its protocols, the results store, metrics, verification and sanity checks."""

from robustlab.eval.runner import EvalOptions, RunResult, evaluate, run
from robustlab.eval.store import ResultsStore

__all__ = ["EvalOptions", "ResultsStore", "RunResult", "evaluate", "run"]
