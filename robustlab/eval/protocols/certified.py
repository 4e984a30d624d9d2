"""The certified protocol: randomized-smoothing certificates per sample, and the check that no
certificate lies.

One task, ``main``: per batch, CERTIFY (``robustlab.certify.smoothing``) every image, then, on the
first ``attack_n`` samples, two attacks on the smoothed classifier (PGD on the soft smoothed
classifier, log of the mean softmax over ``attack_draws`` fresh noise draws per step, as SmoothAdv
attacks it; all ``attack_steps`` steps are run, no early stop), each judged by PREDICT at the point
found:

- the **lie check**: a sample certified (not abstaining) with radius r > 0 is attacked inside the
  ball of radius r around it, away from its certified class cA; the certificate is *contradicted*
  when PREDICT there returns a class other than cA (an abstention is not counted). A sound
  certificate is contradicted only when CERTIFY's bound failed (probability <= alpha) or PREDICT
  erred (probability <= alpha), so with m attacked certificates the expected number contradicted is
  at most 2 * alpha * m; the verdict fails when the count is improbable under that rate (binomial
  tail < 0.001), warns on any smaller non-zero count.
- the **empirical accuracy** at one radius rho (``attack_radius``, default 0.5): a correct sample
  certified at >= rho is robust by its certificate; a correct one certified below rho is attacked
  at rho against its label and stays robust when PREDICT there still returns the label. The gap
  between this and the certified accuracy at rho says how loose the certificates are.

Randomness: each sample draws from generators derived from (seed, sample index, purpose), so its
numbers do not depend on the evaluation batch size, and resumed or sharded runs equal an
uninterrupted one. Per-sample rows go to ``certified_samples``; the summary comes from
:class:`~robustlab.eval.metrics.CertifiedAccuracy`. The leaderboard groups runs by (dataset, noise,
noise scale) and ranks them by ACR.
"""

from __future__ import annotations

import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import binom
from torch import nn

from robustlab.certify import (
    SmoothedClassifier,
    check_settings,
    create_noise,
    max_radius,
    too_few_draws,
)
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import CertifiedAccuracy, wilson_interval
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, Task
from robustlab.eval.store import ResultsStore
from robustlab.models.runtime import eval_mode
from robustlab.predictor import ABSTAIN
from robustlab.seeding import make_generator
from robustlab.threat import ThreatModel

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
_SELECT, _ESTIMATE, _LIE_ATTACK, _LIE_PREDICT, _EMP_ATTACK, _EMP_PREDICT = range(6)
_KEY = zlib.crc32(b"certified")


@dataclass
class CertifiedOptions:
    """Everything that determines a certified run's numbers (besides model, data, seed)."""

    noise: str = "gaussian"
    noise_params: dict[str, Any] = field(default_factory=lambda: {"sigma": 0.25})
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    noise_batch: int = 400
    radii: tuple[float, ...] = DEFAULT_RADII
    attack_n: int = 100  # samples (the first ones) the two attacks run on; 0: none
    attack_steps: int = 20
    attack_draws: int = 8
    attack_radius: float = 0.5


class CertifiedProtocol(Protocol):
    name = "certified"
    sample_table = "certified_samples"
    sample_columns = (
        ("label", "INTEGER NOT NULL"),
        ("prediction", "INTEGER NOT NULL"),       # certified class, or -1 (abstained)
        ("correct", "INTEGER NOT NULL"),          # prediction == label
        ("radius", "REAL"),                       # certified radius (NULL: abstained)
        ("count_selection", "INTEGER NOT NULL"),  # votes for the selected class among the n0 draws
        ("count_estimation", "INTEGER NOT NULL"),  # votes for it among the n draws (nA)
        ("p_lower", "REAL NOT NULL"),             # Clopper-Pearson lower bound of pA
        ("lie_attack_pred", "INTEGER"),           # PREDICT at the attack point inside the radius (NULL: not attacked)
        ("lie_distance", "REAL"),                 # its distance from the image
        ("emp_robust", "INTEGER"),                # empirically robust at attack_radius (NULL: not checked)
        ("emp_attack_pred", "INTEGER"),           # PREDICT at the attack point (NULL: not attacked)
        ("seconds", "REAL NOT NULL"),             # time spent on the sample (certification + attacks)
    )

    def __init__(self, options: CertifiedOptions | None = None, num_classes: int = 10) -> None:
        self.options = o = options or CertifiedOptions()
        self.noise = create_noise(o.noise, **o.noise_params)
        self.num_classes = int(num_classes)
        check_settings(o.n0, o.n, o.alpha, o.noise_batch)  # bad settings fail before a run is created
        if o.attack_n < 0 or o.attack_steps < 1 or o.attack_draws < 1 or not o.attack_radius > 0:
            raise RobustlabError("the attack check needs attack_n >= 0, attack_steps >= 1, attack_draws >= 1 and "
                                 "attack_radius > 0")

    # ------------------------------------------------------------------ configuration and plan

    def config(self) -> dict[str, Any]:
        o = self.options
        return {
            "method": "smoothing",
            "noise": {"name": self.noise.name, "params": dict(self.noise.params)},
            "norm": self.noise.norm,
            "n0": o.n0, "n_draws": o.n, "alpha": o.alpha, "noise_batch": o.noise_batch,
            "radii": [float(r) for r in o.radii],
            "attack": {"n": o.attack_n, "steps": o.attack_steps, "draws": o.attack_draws, "radius": o.attack_radius},
            "num_classes": self.num_classes,
        }

    def plan(self, n: int, image_dim: int) -> list[Task]:
        return [Task("main", "certify", n, {"noise": self.noise.name, "scale": self.noise.scale})]

    def smoothed(self, model: nn.Module) -> SmoothedClassifier:
        o = self.options
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once, by the command, not per batch
            return SmoothedClassifier(model, self.noise, self.num_classes, n0=o.n0, n=o.n, alpha=o.alpha,
                                      batch_size=o.noise_batch, attack_draws=o.attack_draws)

    # ------------------------------------------------------------------ one batch

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        o = self.options
        with eval_mode(model):
            smooth = self.smoothed(model)
            index = [ctx.start + i for i in range(x.shape[0])]

            def gens(purpose: int) -> list[torch.Generator]:
                return [make_generator(ctx.seed, _KEY, i, purpose, device=x.device) for i in index]

            if ctx.status:
                ctx.status("certify", x.shape[0])
            t0 = time.perf_counter()
            cert = smooth.certify(x, gens(_ESTIMATE), gens(_SELECT))
            per_sample = (time.perf_counter() - t0) / x.shape[0]
            rows = []
            for i in range(x.shape[0]):
                t1 = time.perf_counter()
                pred, r = int(cert.prediction[i]), float(cert.radius[i])
                lie_pred = lie_dist = emp_robust = emp_pred = None
                if index[i] < o.attack_n:
                    if ctx.status:
                        ctx.status(f"attack sample {index[i]}", 1)
                    if pred != ABSTAIN and r > 0 and self.noise.norm in ("l2", "l1"):
                        lie_pred, lie_dist = self._attack(smooth, x[i], pred, r, ctx.seed, index[i], _LIE_ATTACK)
                    emp_robust, emp_pred = self._empirical(smooth, x[i], int(y[i]), pred, r, ctx.seed, index[i])
                rows.append((index[i], int(y[i]), pred, int(pred == int(y[i])), r if pred != ABSTAIN else None,
                             int(cert.count_selection[i]), int(cert.count_estimation[i]), float(cert.p_lower[i]),
                             lie_pred, lie_dist, emp_robust, emp_pred, per_sample + time.perf_counter() - t1))
        forwards = x.shape[0] * (o.n0 + o.n)
        return BatchOutput(rows, [{"seconds": sum(r[-1] for r in rows), "gradients": 0, "forwards": forwards}])

    def _empirical(self, smooth: SmoothedClassifier, x: torch.Tensor, label: int, pred: int, r: float,
                   seed: int, index: int) -> tuple[int | None, int | None]:
        rho = self.options.attack_radius
        if self.noise.norm not in ("l2", "l1"):
            return None, None  # no attack in this norm: nothing empirical to say
        if pred != label:
            return 0, None
        if r >= rho:
            return 1, None  # robust at rho by its certificate
        adv_pred, _ = self._attack(smooth, x, label, rho, seed, index, _EMP_ATTACK)
        return int(adv_pred == label), adv_pred

    def _attack(self, smooth: SmoothedClassifier, x: torch.Tensor, label: int, eps: float, seed: int,
                index: int, purpose: int) -> tuple[int, float]:
        """PGD (all steps) on the soft smoothed classifier inside the ``eps`` ball of the noise's norm,
        away from ``label``; returns PREDICT at the point found and its distance from ``x``."""
        o = self.options
        threat = ThreatModel(self.noise.norm, eps)
        gen = make_generator(seed, _KEY, index, purpose, device=x.device)
        smooth.set_generator(gen)
        x0 = x[None]
        target = torch.tensor([label], device=x.device)
        x_adv = x0.clone()
        step = 2.0 * eps / o.attack_steps
        for _ in range(o.attack_steps):
            z = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = nn.functional.nll_loss(smooth(z), target)
                (g,) = torch.autograd.grad(loss, z)
            x_adv = threat.project(x_adv + threat.steepest_step(g, step, x_adv), x0).detach()
        adv_pred = int(smooth.predict(x_adv, [make_generator(seed, _KEY, index, purpose + 1, device=x.device)])[0])
        return adv_pred, float(threat.distance(x_adv, x0)[0])

    # ------------------------------------------------------------------ live checks at the end

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        o = self.options
        checks = sanity.mode_verdicts({**info, "randomized": False})
        message = too_few_draws(o.n, o.alpha)
        if message:
            checks.append(sanity.verdict("draws", "fail", message))
        else:
            top = max_radius(self.noise, o.n, o.alpha, tuple(probe_x.shape[1:]))
            checks.append(sanity.verdict("draws", "pass", f"n={o.n} draws at alpha={o.alpha:g} can certify radii up to "
                                         f"{top:.4g} ({self.noise.norm})"))
        return checks

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        config = run["config"]
        rows = store.sample_rows(cls.sample_table, run["run_id"], "main")
        radii = tuple(float(r) for r in config.get("radii", DEFAULT_RADII))
        metric = CertifiedAccuracy(radii).update([bool(r["correct"]) for r in rows],
                                                 [r["radius"] if r["prediction"] != ABSTAIN else None for r in rows])
        m = metric.compute()
        noise = config["noise"]
        scale = noise["params"].get("sigma", noise["params"].get("keep"))
        lie = lie_check(rows, config["alpha"])
        emp = empirical(rows, config["attack"]["radius"])
        summary = {
            "protocol": cls.name,
            "method": "smoothing",
            "noise": noise,
            "norm": config["norm"],
            "scale": scale,
            "n": m["n"],
            "done": m["n"],
            "certified_accuracy": {f"{t:g}": a for t, a in m["certified_accuracy"].items()},
            "ci95": {f"{t:g}": ci for t, ci in m["ci95"].items()},
            "acr": m["acr"],
            "abstain_rate": m["abstain_rate"],
            "clean_accuracy": (sum(1 for r in rows if r["correct"]) / len(rows)) if rows else None,
            "lie_check": lie,
            "empirical": emp,
            "seconds": round(sum(r["seconds"] for r in rows), 3),
            # the largest radius n draws can certify (n unanimous votes), for the additive noises
            "max_radius": (max_radius(create_noise(noise["name"], **noise["params"]), config["n_draws"], config["alpha"],
                                      (1, 1, 1)) if config["norm"] != "l0" else None),
            "settings": {k: config[k] for k in ("n0", "n_draws", "alpha", "noise_batch")},
        }
        if checks is not None:
            checks.append(lie_verdict(lie, config["norm"]))
        return summary

    # ranked by ACR, then certified accuracy per radius; fewer abstentions break ties
    leaderboard_columns = ("acr", "certified_accuracy", "-abstain_rate")

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """(dataset, noise, scale): certificates under different noises or scales are not comparable.
        Ranked by ACR (then certified accuracy at radius 0)."""
        noise = run["config"]["noise"]
        scale = noise["params"].get("sigma", noise["params"].get("keep"))
        label = "keep" if noise["name"] == "ablation" else "σ"
        return ((run["dataset"], cls.name, noise["name"], float(scale)),
                f"{run['dataset']} · certified · {noise['name']} {label} = {scale:g} ({run['config']['norm']})")



def lie_check(rows: list[Any], alpha: float) -> dict[str, Any]:
    """How many attacked certificates PREDICT contradicted inside their radius, against the number a
    sound run would give at most on average (2 * alpha per certificate: CERTIFY's and PREDICT's
    failure rates), and the binomial tail probability of seeing that many."""
    attacked = [r for r in rows if r["lie_attack_pred"] is not None]
    bad = [r for r in attacked if r["lie_attack_pred"] not in (ABSTAIN, r["prediction"])]
    abstained = sum(1 for r in attacked if r["lie_attack_pred"] == ABSTAIN)
    rate = min(1.0, 2 * alpha)
    tail = float(binom.sf(len(bad) - 1, len(attacked), rate)) if attacked and bad else 1.0
    return {"attacked": len(attacked), "contradicted": len(bad), "abstained_under_attack": abstained,
            "expected_at_most": rate * len(attacked), "tail_probability": tail,
            "contradicted_samples": [r["sample_index"] for r in bad]}


def lie_verdict(lie: dict[str, Any], norm: str) -> dict[str, str]:
    if norm not in ("l2", "l1"):
        return sanity.verdict("certificates", "warn", f"not checked: robustlab has no {norm} attack to try the "
                              "certificates with")
    if not lie["attacked"]:
        return sanity.verdict("certificates", "warn", "not checked: no sample with a positive radius was attacked")
    detail = (f"PGD with EOT on the soft smoothed classifier, inside each certified radius, contradicted "
              f"{lie['contradicted']} of {lie['attacked']} certificates (PREDICT returned another class; "
              f"{lie['abstained_under_attack']} abstained); a sound run averages at most "
              f"{lie['expected_at_most']:.3g} (2 alpha each)")
    if lie["contradicted"] == 0:
        return sanity.verdict("certificates", "pass", detail)
    if lie["tail_probability"] < 1e-3:
        return sanity.verdict("certificates", "fail", detail + f": that many has probability {lie['tail_probability']:.2g}; "
                              f"these certificates lie (samples {lie['contradicted_samples'][:10]})")
    return sanity.verdict("certificates", "warn", detail + f" (probability {lie['tail_probability']:.2g} under the "
                          "failure rate)")


def empirical(rows: list[Any], rho: float) -> dict[str, Any] | None:
    """Empirical robust accuracy of the smoothed classifier at radius ``rho`` on the checked samples
    (robust: correct and certified at >= rho, or correct and PREDICT unchanged by the attack at rho),
    with its 95% interval. None when nothing was checked."""
    checked = [r for r in rows if r["emp_robust"] is not None]
    if not checked:
        return None
    robust = sum(1 for r in checked if r["emp_robust"])
    certified = sum(1 for r in checked if r["correct"] and r["radius"] is not None and r["radius"] >= rho)
    acc, cert = robust / len(checked), certified / len(checked)
    attacked = sum(1 for r in checked if r["emp_attack_pred"] is not None)
    return {"radius": rho, "checked": len(checked), "attacked": attacked, "empirical_accuracy": acc,
            "certified_accuracy": cert, "gap": acc - cert, "ci95": wilson_interval(acc, len(checked))}
