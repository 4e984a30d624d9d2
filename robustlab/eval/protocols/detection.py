"""The detection protocol: a classifier guarded by an adversarial-example detector, evaluated with the
threshold fixed on clean images before any attack, under plain PGD and under the adaptive attack on
classifier and detector together.

Before any batch (``prepare``, once per run): the detector is fitted (:func:`fit_detector`, on the
clean training images of :class:`DetectorData`; LID also on PGD examples of them, seeded by the run)
and its threshold fixed on separate clean images at a false-positive rate (:func:`calibrate`, 5% by
default). The run's configuration records what they are fitted and calibrated on; the fitted state
(``detector.safetensors``) and the operating point (``calibration.json``: threshold and the spread of
clean scores the adaptive attack scales by) are kept with the run in the store's run files, so a
resumed run loads both instead of fitting and calibrating again.

One task, ``main``. Per batch: every image's clean prediction and detector score; then, on the
correctly classified ones, PGD (``pgd_steps``, CE loss, the classifier alone: what a
detector-unaware attacker does) and the detector-aware attack
(:func:`robustlab.attacks.detector_aware.detector_aware_attack`). Every adversarial example is
re-checked: inside the threat model, its prediction and score recomputed on the exact (not BPDA)
detector. Per-sample rows go to ``detection_samples``.

**What counts** (as in Carlini & Wagner 2017 and Tramer 2022): an attack *succeeds* on a point when it
finds x' in the threat model that the classifier misclassifies AND the detector does not flag (score
<= threshold). A point is robust for classifier + detector when it is correctly classified clean and
no attack succeeds on it (a misclassified clean image counts as an error, flagged or not). The
headline ``robust_accuracy`` is that, per sample worst case over PGD and the adaptive attack; the PGD-only
figure (``non_adaptive``) is what a detector paper evaluated without an adaptive attack would print.
``auc`` and ``detection_rate`` (true-positive rate at the threshold) are per attack, on its
misclassified adversarial examples against the clean scores of all evaluated images.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from robustlab.attacks.base import create_attack
from robustlab.attacks.detector_aware import DetectorAwareOptions, detector_aware_attack
from robustlab.defenses.detection import Detector, roc_auc, scores, threshold_at
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import wilson_interval
from robustlab.eval.protocols.base import BatchContext, BatchOutput, Protocol, RunFiles, Task
from robustlab.eval.store import ResultsStore
from robustlab.models.runtime import eval_mode
from robustlab.threat import ThreatModel

_PGD_KEY, _ADAPTIVE_KEY, _FIT_KEY = 0x9D6, 0xADA7, zlib.crc32(b"detector-fit")
ATTACKS = ("pgd", "adaptive")


@dataclass
class Calibration:
    """The operating point, fixed on clean images before any attack: flag scores above ``threshold``
    (the (1 - fpr) quantile of ``n`` clean scores); ``scale``: their standard deviation (the adaptive
    attack's unit for the detector term); ``source``: which images."""

    threshold: float
    fpr: float
    scale: float
    n: int
    source: str = ""


def calibrate(detector: Detector, model: nn.Module, x: torch.Tensor, fpr: float = 0.05, source: str = "") -> Calibration:
    """The detector's threshold at false-positive rate ``fpr`` on the clean images ``x``."""
    if len(x) < 2:
        raise RobustlabError("the detector's threshold needs at least 2 clean calibration images")
    with eval_mode(model):
        s = scores(detector, model, x)
    return Calibration(threshold_at(s, fpr), float(fpr), float(s.double().std()), len(x), source)


FIT_ATTACK_STEPS = 10  # PGD steps of the adversarial examples a detector like LID is fitted on


def fit_detector(detector: Detector, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 seed: int = 0, attack_steps: int = FIT_ATTACK_STEPS) -> dict[str, Any]:
    """Fit ``detector`` on the clean training images ``x`` (labels ``y``); a detector trained to tell
    clean from adversarial images (LID) also gets PGD examples of them (``attack_steps`` steps in
    ``threat``, seeded). Returns what was done, for the run's configuration."""
    record: dict[str, Any] = {"n": len(x)}
    with eval_mode(model):
        x_adv = None
        if detector.needs_adversarial:
            gen = torch.Generator(device=x.device).manual_seed(seed ^ _FIT_KEY)
            pgd = create_attack("pgd", threat, steps=attack_steps)
            x_adv = torch.cat([pgd.run(model, x[i:i + 256], y[i:i + 256], gen).x_adv for i in range(0, len(x), 256)])
            record["adversarial"] = pgd.config()
        detector.fit(model, x, y, x_adv)
    return record


@dataclass
class DetectorData:
    """What the detector is fitted on (clean training images ``x`` with labels ``y``) and what its
    threshold is fixed on (other clean images ``x_cal``, at false-positive rate ``fpr``), with where
    they come from (for the run's record)."""

    x: torch.Tensor
    y: torch.Tensor
    x_cal: torch.Tensor
    fpr: float = 0.05
    source: str = ""
    cal_source: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.fpr < 1:
            raise RobustlabError(f"the false-positive rate must be in (0, 1), got {self.fpr:g}")
        if len(self.x) < 1 or len(self.x) != len(self.y):
            raise RobustlabError(f"the detector needs clean training images with one label each, got {len(self.x)} "
                                 f"images and {len(self.y)} labels")
        if len(self.x_cal) < 2:
            raise RobustlabError("the detector's threshold needs at least 2 clean calibration images")


_STATE_FILE, _CALIBRATION_FILE = "detector.safetensors", "calibration.json"


@dataclass
class DetectionOptions:
    """The attacks of a detection run: PGD steps, and the adaptive attack (None: PGD only, which the
    leaderboard marks as a weaker evaluation)."""

    pgd_steps: int = 40
    adaptive: DetectorAwareOptions | None = field(default_factory=DetectorAwareOptions)


class DetectionProtocol(Protocol):
    name = "detection"
    sample_table = "detection_samples"
    sample_columns = (
        ("label", "INTEGER NOT NULL"),
        ("clean_pred", "INTEGER NOT NULL"),
        ("clean_correct", "INTEGER NOT NULL"),
        ("clean_score", "REAL NOT NULL"),
        ("clean_flagged", "INTEGER NOT NULL"),
        ("pgd_pred", "INTEGER"),             # NULL: not attacked (misclassified clean)
        ("pgd_score", "REAL"),
        ("pgd_flagged", "INTEGER"),
        ("pgd_fooled", "INTEGER"),           # misclassified and not flagged
        ("adaptive_pred", "INTEGER"),        # NULL: not attacked (or no adaptive attack)
        ("adaptive_score", "REAL"),
        ("adaptive_flagged", "INTEGER"),
        ("adaptive_fooled", "INTEGER"),
        ("robust", "INTEGER NOT NULL"),      # correct clean and fooled by no attack
        ("seconds", "REAL NOT NULL"),
    )
    # ranked by the honest number; clean accuracy, then the plain-PGD AUC, break ties
    leaderboard_columns = ("robust_accuracy", "clean_accuracy", "auc", "adaptive_detection_rate")

    def __init__(self, detector: Detector, threat: ThreatModel, data: DetectorData,
                 options: DetectionOptions | None = None) -> None:
        self.detector, self.threat, self.data = detector, threat, data
        self.options = options or DetectionOptions()
        if self.options.pgd_steps < 1:
            raise RobustlabError(f"PGD steps must be >= 1, got {self.options.pgd_steps}")
        self.pgd = create_attack("pgd", threat, steps=self.options.pgd_steps)
        self.calibration: Calibration | None = None  # set by prepare

    def config(self) -> dict[str, Any]:
        a, d = self.options.adaptive, self.data
        fit: dict[str, Any] = {"n": len(d.x), "source": d.source}
        if self.detector.needs_adversarial:
            fit["adversarial"] = create_attack("pgd", self.threat, steps=FIT_ATTACK_STEPS).config()
        return {"norm": self.threat.norm, "eps": self.threat.eps, "detector": self.detector.config(),
                "fit": fit, "calibration": {"n": len(d.x_cal), "source": d.cal_source, "fpr": d.fpr},
                "fpr": d.fpr, "pgd": self.pgd.config(), "adaptive": a.config() if a is not None else None}

    @classmethod
    def normalize_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Runs stored before the consistent-views round existed ran without it; runs stored before the
        fit moved into the run kept its outcome (threshold, scale) in the configuration."""
        adaptive = config.get("adaptive")
        if adaptive and "views_first" not in (adaptive.get("params") or {}):
            config = {**config, "adaptive": {**adaptive, "params": {**adaptive["params"], "views_first": False}}}
        if "threshold" in config:
            cal = config.get("calibration") or {}
            config = {k: v for k, v in config.items() if k != "threshold"}
            config["calibration"] = {"n": cal.get("n"), "source": cal.get("source", ""), "fpr": cal.get("fpr")}
        return config

    def prepare(self, model: nn.Module, files: RunFiles, seed: int, device: torch.device,
                log: Callable[[str], None] = lambda msg: None) -> None:
        """Fit the detector (or load the state this run fitted before it was interrupted), then fix its
        threshold on the calibration images."""
        from safetensors.torch import load, save

        d, name = self.data, self.detector.name
        if self.detector.trained:
            kept = files.get(_STATE_FILE)
            if kept is not None:
                self.detector.load_fitted_state(load(kept))
                log(f"robustlab: detector {name}: loaded the state fitted on these {len(d.x)} training images "
                    f"when this run started")
            else:
                log(f"robustlab: detector {name}: fitting on {len(d.x)} training images")
                fit_detector(self.detector, model, d.x.to(device), d.y.to(device), self.threat, seed, FIT_ATTACK_STEPS)
                files.put(_STATE_FILE, save({k: v.detach().cpu().contiguous()
                                             for k, v in self.detector.fitted_state().items()}))
        kept = files.get(_CALIBRATION_FILE)
        if kept is not None:  # the operating point this run fixed when it started, exactly
            self.calibration = Calibration(**json.loads(kept))
        else:
            self.calibration = calibrate(self.detector, model, d.x_cal.to(device), d.fpr, d.cal_source)
            files.put(_CALIBRATION_FILE, json.dumps(asdict(self.calibration)).encode())

    def attack_records(self) -> list[dict[str, Any]]:
        out = [{**self.pgd.config(), "targeted": False, "minimum_norm": False}]
        if self.options.adaptive is not None:
            out.append({**self.options.adaptive.config(), "targeted": False, "minimum_norm": False})
        return out

    def plan(self, n: int, image_dim: int) -> list[Task]:
        return [Task("main", "main", n, {"eps": self.threat.eps, "norm": self.threat.norm})]

    # ------------------------------------------------------------------ one batch

    def _judge(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
        """An attack's examples re-checked on the model and the exact detector: prediction, score,
        flagged, fooled (misclassified, unflagged, and inside the threat model)."""
        x_adv = self.threat.project(x_adv.detach(), x)  # clip float noise; the attacks stay inside already
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
            s = self.detector.score(model, x_adv)
        flagged = s > self.calibration.threshold
        fooled = (pred != y) & ~flagged & self.threat.contains(x_adv, x)
        return pred, s, flagged, fooled

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        t0 = time.perf_counter()
        b = x.shape[0]
        tau = self.calibration.threshold
        none = [None] * b
        pgd_cols: list[list[Any]] = [none, none, none, none]
        ada_cols: list[list[Any]] = [none, none, none, none]
        costs = []
        with eval_mode(model):
            with torch.no_grad():
                clean_pred = model(x).argmax(1)
                clean_score = self.detector.score(model, x)
            correct = clean_pred == y
            robust = correct.clone()
            idx = correct.nonzero(as_tuple=True)[0]
            if idx.numel():
                xs, ys = x[idx], y[idx]
                if ctx.status:
                    ctx.status(f"pgd-{self.options.pgd_steps}", int(idx.numel()))
                t1 = time.perf_counter()
                res = self.pgd.run(model, xs, ys, ctx.generator(_PGD_KEY))
                judged = self._judge(model, xs, res.x_adv, ys)
                pgd_cols = self._scatter(judged, idx, b)
                robust[idx[judged[3]]] = False
                costs.append({"seconds": time.perf_counter() - t1, "gradients": int(res.gradients.sum()),
                              "forwards": int(res.forwards.sum())})
                if self.options.adaptive is not None:
                    t1 = time.perf_counter()
                    views = self.detector.views if self.detector.compares_views else None
                    adv = detector_aware_attack(model, lambda z: self.detector.score(model, z), xs, ys, self.threat,
                                                tau, self.calibration.scale, self.options.adaptive,
                                                ctx.generator(_ADAPTIVE_KEY), ctx.status, views)
                    judged = self._judge(model, xs, adv.x_adv, ys)
                    ada_cols = self._scatter(judged, idx, b)
                    robust[idx[judged[3]]] = False
                    costs.append({"seconds": time.perf_counter() - t1, "gradients": int(adv.gradients.sum()),
                                  "forwards": int(adv.gradients.sum())})
        per = (time.perf_counter() - t0) / b
        rows = []
        for i in range(b):
            rows.append((ctx.start + i, int(y[i]), int(clean_pred[i]), int(correct[i]), float(clean_score[i]),
                         int(clean_score[i] > tau), *(c[i] for c in pgd_cols), *(c[i] for c in ada_cols),
                         int(robust[i]), per))
        return BatchOutput(rows, costs or [{"seconds": 0.0, "gradients": 0, "forwards": 0}])

    @staticmethod
    def _scatter(judged, idx: torch.Tensor, b: int) -> list[list[Any]]:
        """Per-attacked-point (pred, score, flagged, fooled) as full-batch columns (None: not attacked)."""
        cols: list[list[Any]] = [[None] * b for _ in range(4)]
        for j, i in enumerate(idx.tolist()):
            cols[0][i] = int(judged[0][j])
            cols[1][i] = float(judged[1][j])
            cols[2][i] = int(judged[2][j])
            cols[3][i] = int(judged[3][j])
        return cols

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        return sanity.mode_verdicts(info)

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        config = run["config"]
        kept = store.load_file(run["run_id"], _CALIBRATION_FILE)
        calibration = json.loads(kept) if kept is not None else dict(config.get("calibration") or {})
        if kept is None and "threshold" in config:  # stored before the fit moved into the run
            calibration["threshold"] = config["threshold"]
        rows = store.sample_rows(cls.sample_table, run["run_id"], "main")
        n = len(rows)
        clean = [r["clean_score"] for r in rows]
        correct = sum(r["clean_correct"] for r in rows)
        robust = sum(r["robust"] for r in rows)
        per_attack: dict[str, Any] = {}
        for a in ATTACKS:
            if a == "adaptive" and config.get("adaptive") is None:
                continue
            attacked = [r for r in rows if r[f"{a}_pred"] is not None]
            wrong = [r for r in attacked if r[f"{a}_pred"] != r["label"]]
            fooled = sum(r[f"{a}_fooled"] for r in attacked)
            flagged = sum(r[f"{a}_flagged"] for r in wrong)
            per_attack[a] = {
                "attacked": len(attacked),
                "misclassified": len(wrong),
                "flagged": flagged,
                "fooled": fooled,
                "auc": roc_auc(torch.tensor(clean), torch.tensor([r[f"{a}_score"] for r in wrong])) if wrong and clean else None,
                "detection_rate": flagged / len(wrong) if wrong else None,
                "robust_accuracy": (correct - fooled) / n if n else None,
                "classifier_robust_accuracy": (correct - len(wrong)) / n if n else None,
            }
        costs = store.attack_costs(run["run_id"], "main")
        for a, c in zip(per_attack.values(), costs):
            a["seconds"] = round(c["seconds"], 3)
        pgd = per_attack.get("pgd", {})
        adaptive = per_attack.get("adaptive", {})
        acc = robust / n if n else None
        summary = {
            "protocol": cls.name, "model": run["model"], "dataset": run["dataset"], "split": run["split"],
            "n": n, "threat": {"norm": config["norm"], "eps": config["eps"]},
            "detector": config["detector"], "fpr": config["fpr"], "threshold": calibration.get("threshold"),
            "calibration": calibration,
            "clean_accuracy": correct / n if n else None,
            "clean_flag_rate": sum(r["clean_flagged"] for r in rows) / n if n else None,
            "robust_accuracy": acc,
            "ci95": {"clean": wilson_interval(correct / n if n else None, n), "robust": wilson_interval(acc, n)},
            "non_adaptive": {"robust_accuracy": pgd.get("robust_accuracy")},
            "undefended_robust_accuracy": pgd.get("classifier_robust_accuracy"),
            "auc": pgd.get("auc"), "detection_rate": pgd.get("detection_rate"),
            "adaptive_auc": adaptive.get("auc"), "adaptive_detection_rate": adaptive.get("detection_rate"),
            "attacks": per_attack,
            "seconds": round(sum(r["seconds"] for r in rows), 3),
        }
        if run.get("status") != "complete" and n < run["n"]:
            summary.update(done=n, partial=True)
        if checks is not None:
            checks.append(adaptive_verdict(summary))
        return summary

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """(dataset, detector with its parameters, norm, eps, false-positive rate)."""
        c = run["config"]
        det = c["detector"]
        params = ",".join(f"{k}={v}" for k, v in sorted((det.get("params") or {}).items()))
        eps = float(f"{float(c['eps']):.9g}")
        return ((run["dataset"], cls.name, det["name"], params, c["norm"], eps, float(c["fpr"])),
                (f"{run['dataset']} · detection · {det['name']}({params.replace(',', ', ')}) at {100 * float(c['fpr']):g}% FPR · {c['norm']} "
                f"eps={eps:g}"))

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """PGD alone (no detector-aware attack), or one weaker than the default, is not a full evaluation."""
        a = run["config"].get("adaptive")
        if a is None:
            return ["no adaptive attack (plain PGD only): the detector was not attacked"]
        p, d = a.get("params") or {}, DetectorAwareOptions()
        if int(p.get("steps", 0)) * int(p.get("rounds", 0)) < d.steps * d.rounds:
            return [(f"adaptive attack weaker than the default ({p.get('steps')} steps x {p.get('rounds')} rounds < "
                    f"{d.steps} x {d.rounds})")]
        return []


def adaptive_verdict(s: dict[str, Any]) -> dict[str, str]:
    """The non-adaptive number next to the adaptive one: a detector that only holds against plain PGD
    is not a defense."""
    pgd, worst = s["non_adaptive"]["robust_accuracy"], s["robust_accuracy"]
    if "adaptive" not in s["attacks"]:
        return sanity.verdict("adaptive attack", "fail", "only plain PGD ran: the detector was never attacked; its "
                              "number says nothing about an attacker who knows it")
    if pgd is None or worst is None:
        return sanity.verdict("adaptive attack", "warn", "no points evaluated")
    detail = (f"plain PGD leaves {100 * pgd:.2f}% robust (classifier + detector), the detector-aware attack "
              f"{100 * s['attacks']['adaptive']['robust_accuracy']:.2f}%; reported worst case {100 * worst:.2f}%")
    if pgd - worst > 0.05:
        return sanity.verdict("adaptive attack", "warn", detail + ": the detector holds only against attackers that "
                              "ignore it; only the adaptive number counts")
    return sanity.verdict("adaptive attack", "pass", detail)
