"""Metrics as objects: ``update`` with a batch's per-sample outcomes, ``compute`` the numbers,
``merge`` two states (per batch, per resumed session, per rank) into the state of one pass.

A metric's state is a handful of counts, so merging is addition and the numbers of a run do not
depend on how its samples were split into batches, sessions or processes. The summary of every run
is computed by feeding its stored per-sample rows to these objects (one code path for ``eval``,
``report`` and ``leaderboard``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


def wilson_interval(p: float | None, n: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion ``p`` measured on ``n`` samples (95% for z=1.96):
    the uncertainty of an accuracy due to the finite test sample. None without samples."""
    if p is None or not n:
        return None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class Metric:
    """update / compute / merge. Subclasses hold only counts (mergeable by addition)."""

    def merge(self, other: "Metric") -> "Metric":  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class RobustAccuracy(Metric):
    """Clean and robust accuracy of a worst-case ensemble, and how many points each attack broke
    first. ``update(clean_correct, robust, broken_by)`` takes per-sample sequences (broken_by: the
    index of the attack that broke the sample, or None)."""

    n: int = 0
    clean: int = 0
    robust: int = 0
    broken: dict[int, int] = field(default_factory=dict)

    def update(self, clean_correct: Iterable[bool], robust: Iterable[bool], broken_by: Iterable[int | None]) -> "RobustAccuracy":
        for c, r, b in zip(clean_correct, robust, broken_by):
            self.n += 1
            self.clean += bool(c)
            self.robust += bool(r)
            if b is not None:
                self.broken[int(b)] = self.broken.get(int(b), 0) + 1
        return self

    def merge(self, other: "RobustAccuracy") -> "RobustAccuracy":
        broken = dict(self.broken)
        for k, v in other.broken.items():
            broken[k] = broken.get(k, 0) + v
        return RobustAccuracy(self.n + other.n, self.clean + other.clean, self.robust + other.robust, broken)

    def compute(self) -> dict[str, Any]:
        n = self.n
        clean = self.clean / n if n else None
        robust = self.robust / n if n else None
        return {"n": n, "clean_accuracy": clean, "robust_accuracy": robust,
                "ci95": {"clean": wilson_interval(clean, n), "robust": wilson_interval(robust, n)}}

    def after_each(self, attacks: int) -> list[tuple[int, float | None]]:
        """(points broken first by attack i, robust accuracy after attacks 0..i) for each attack."""
        still, out = self.clean, []
        for i in range(attacks):
            still -= self.broken.get(i, 0)
            out.append((self.broken.get(i, 0), still / self.n if self.n else None))
        return out


@dataclass
class CertifiedAccuracy(Metric):
    """Certified accuracy at radii (the fraction of samples predicted correctly with a certified radius
    of at least r), the average certified radius (ACR: the mean radius over correct, certified samples,
    zero elsewhere) and the abstention rate. ``update(correct, radius)``: radius None or <0 = abstained
    or not certified."""

    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n: int = 0
    abstained: int = 0
    radius_sum: float = 0.0
    at: dict[float, int] = field(default_factory=dict)

    def update(self, correct: Iterable[bool], radius: Iterable[float | None]) -> "CertifiedAccuracy":
        for c, r in zip(correct, radius):
            self.n += 1
            if r is None or r < 0:
                self.abstained += 1
                continue
            if c:
                self.radius_sum += float(r)
                for t in self.radii:
                    if r >= t:
                        self.at[t] = self.at.get(t, 0) + 1
        return self

    def merge(self, other: "CertifiedAccuracy") -> "CertifiedAccuracy":
        if tuple(self.radii) != tuple(other.radii):
            raise ValueError("certified accuracies at different radii do not merge")
        at = {t: self.at.get(t, 0) + other.at.get(t, 0) for t in self.radii}
        return CertifiedAccuracy(self.radii, self.n + other.n, self.abstained + other.abstained,
                                 self.radius_sum + other.radius_sum, at)

    def compute(self) -> dict[str, Any]:
        n = self.n
        acc = {t: (self.at.get(t, 0) / n if n else None) for t in self.radii}
        return {"n": n, "certified_accuracy": acc, "acr": self.radius_sum / n if n else None,
                "abstain_rate": self.abstained / n if n else None,
                "ci95": {t: wilson_interval(a, n) for t, a in acc.items()}}


@dataclass
class VerifiedAccuracy(Metric):
    """Verified robust accuracy (bound propagation) next to the empirical robust accuracy of an attack
    on the same points, and the certificates the attack contradicts. ``update(clean_correct,
    verified, attack_robust)``: per sample, correctly classified, verified at the radius (only a
    correct point can be), not broken by the attack. A verified point the attack breaks is a lie
    (a bug: must be zero); the gap is empirical minus verified accuracy."""

    n: int = 0
    clean: int = 0
    verified: int = 0
    robust: int = 0
    lies: int = 0

    def update(self, clean_correct: Iterable[bool], verified: Iterable[bool],
               attack_robust: Iterable[bool]) -> "VerifiedAccuracy":
        for c, v, r in zip(clean_correct, verified, attack_robust):
            self.n += 1
            self.clean += bool(c)
            self.verified += bool(c and v)
            self.robust += bool(c and r)
            self.lies += bool(c and v and not r)
        return self

    def merge(self, other: "VerifiedAccuracy") -> "VerifiedAccuracy":
        return VerifiedAccuracy(self.n + other.n, self.clean + other.clean, self.verified + other.verified,
                                self.robust + other.robust, self.lies + other.lies)

    def compute(self) -> dict[str, Any]:
        n = self.n
        clean, verified, robust = ((v / n if n else None) for v in (self.clean, self.verified, self.robust))
        return {"n": n, "clean_accuracy": clean, "verified_accuracy": verified, "empirical_robust_accuracy": robust,
                "gap": robust - verified if n else None, "lies": self.lies,
                "ci95": {"clean": wilson_interval(clean, n), "verified": wilson_interval(verified, n),
                         "empirical": wilson_interval(robust, n)}}


@dataclass
class CorruptionError(Metric):
    """Error per (corruption, severity), their mean per corruption, and against a baseline model's
    errors the corruption error CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, mCE (mean CE over
    corruptions) and relative mCE (CE of the drop from clean error: sum_s (E_{s,c} - E_clean) /
    sum_s (E^base_{s,c} - E^base_clean)), as in Hendrycks & Dietterich (2019). ``update(corruption,
    severity, correct)``; the clean baseline is corruption ``"clean"``, severity 0."""

    counts: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def update(self, corruption: str, severity: int, correct: Iterable[bool]) -> "CorruptionError":
        cell = self.counts.setdefault((corruption, int(severity)), [0, 0])
        for c in correct:
            cell[0] += 1
            cell[1] += 0 if c else 1
        return self

    def merge(self, other: "CorruptionError") -> "CorruptionError":
        out = CorruptionError()
        for src in (self.counts, other.counts):
            for key, (n, e) in src.items():
                cell = out.counts.setdefault(key, [0, 0])
                cell[0] += n
                cell[1] += e
        return out

    def errors(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for (c, s), (n, e) in sorted(self.counts.items()):
            if n:
                out.setdefault(c, {})[s] = e / n
        return out

    def compute(self, baseline: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
        """The errors per corruption and severity, their mean per corruption and over every corruption
        (``mean_corruption_error``: the unnormalized mCE that CIFAR-10-C papers report); with a
        ``baseline`` (another model's :meth:`errors`, e.g. :data:`ALEXNET_IMAGENET_C`), CE and relative
        CE per corruption over the severities both have, and their means mCE and relative mCE."""
        err = self.errors()
        clean = err.get("clean", {}).get(0)
        corruptions = [c for c in err if c != "clean"]
        mean_error = {c: sum(err[c].values()) / len(err[c]) for c in corruptions}
        result: dict[str, Any] = {"errors": err, "clean_error": clean, "mean_error": mean_error,
                                  "mean_corruption_error": sum(mean_error.values()) / len(mean_error) if mean_error else None}
        if baseline:
            ce, rel = {}, {}
            base_clean = baseline.get("clean", {}).get(0)
            for c in corruptions:
                if c not in baseline:
                    continue
                sev = [s for s in err[c] if s in baseline[c]]
                denom = sum(baseline[c][s] for s in sev)
                if denom > 0:
                    ce[c] = sum(err[c][s] for s in sev) / denom
                if clean is not None and base_clean is not None:
                    rdenom = sum(baseline[c][s] - base_clean for s in sev)
                    if rdenom > 0:
                        rel[c] = sum(err[c][s] - clean for s in sev) / rdenom
            result.update(ce=ce, mce=sum(ce.values()) / len(ce) if ce else None,
                          relative_ce=rel, relative_mce=sum(rel.values()) / len(rel) if rel else None)
        return result


#: AlexNet's published ImageNet-C top-1 errors, the baseline of mCE on ImageNet-C (Hendrycks &
#: Dietterich, ICLR 2019; the numbers of hendrycks/robustness, ImageNet-C/test.py, also used by AugMix's
#: imagenet.py). Only the mean over the five severities is published; it stands for every severity
#: here, so CE = sum_s E_s / sum_s E^AlexNet_s = mean_s E_s / published mean, exactly the published
#: formula when all five severities are evaluated. Clean: AlexNet's top-1 error of 43.5% (the paper's
#: table 1; relative mCE uses it).
ALEXNET_IMAGENET_C_MEAN: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
ALEXNET_CLEAN_ERROR = 0.435
ALEXNET_IMAGENET_C: dict[str, dict[int, float]] = {
    "clean": {0: ALEXNET_CLEAN_ERROR},
    **{c: {s: e for s in (1, 2, 3, 4, 5)} for c, e in ALEXNET_IMAGENET_C_MEAN.items()},
}
#: Baselines known by name (``--baseline alexnet``); any stored corruption run is one too.
NAMED_BASELINES: dict[str, dict[str, dict[int, float]]] = {"alexnet": ALEXNET_IMAGENET_C}


def baseline_from_summary(summary: dict[str, Any]) -> dict[str, dict[int, float]]:
    """A corruption run's stored summary as a baseline (its ``errors``; JSON turned the severities
    into strings)."""
    return {c: {int(s): float(e) for s, e in per.items()} for c, per in summary.get("errors", {}).items()}


@dataclass
class FlipRate(Metric):
    """Stability under perturbation sequences (ImageNet-P): per perturbation the flip probability FP
    (flipped frame pairs / pairs) and the mean top-5 distance uT5D; against a baseline's numbers the
    flip rate FR = FP / FP_base, mFR (mean FR) and mT5D (mean of uT5D / uT5D_base), as in Hendrycks &
    Dietterich (2019). ``update(perturbation, flips, t5d, pairs)`` with per-sequence counts."""

    counts: dict[str, list[int]] = field(default_factory=dict)  # perturbation -> [pairs, flips, t5d sum]

    def update(self, perturbation: str, flips: Iterable[int], t5d: Iterable[int], pairs: Iterable[int]) -> FlipRate:
        cell = self.counts.setdefault(perturbation, [0, 0, 0])
        for f, d, p in zip(flips, t5d, pairs):
            cell[0] += int(p)
            cell[1] += int(f)
            cell[2] += int(d)
        return self

    def merge(self, other: FlipRate) -> FlipRate:
        out = FlipRate({k: list(v) for k, v in self.counts.items()})
        for k, v in other.counts.items():
            cell = out.counts.setdefault(k, [0, 0, 0])
            for i in range(3):
                cell[i] += v[i]
        return out

    def compute(self, baseline: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        """``baseline``: another model's ``per_perturbation`` (flip_probability and t5d per perturbation)."""
        per = {k: {"pairs": p, "flip_probability": f / p, "t5d": d / p} for k, (p, f, d) in self.counts.items() if p}
        result: dict[str, Any] = {"per_perturbation": per,
                                  "mean_flip_probability": sum(v["flip_probability"] for v in per.values()) / len(per)
                                  if per else None}
        if baseline:
            fr = {k: v["flip_probability"] / baseline[k]["flip_probability"] for k, v in per.items()
                  if k in baseline and baseline[k]["flip_probability"] > 0}
            t5 = {k: v["t5d"] / baseline[k]["t5d"] for k, v in per.items() if k in baseline and baseline[k]["t5d"] > 0}
            result.update(flip_rate=fr, mfr=sum(fr.values()) / len(fr) if fr else None,
                          t5d_ratio=t5, mt5d=sum(t5.values()) / len(t5) if t5 else None)
        return result


@dataclass
class ZeroShotAccuracy(Metric):
    """Clean and robust zero-shot accuracy per data set and their average over data sets.
    ``update(dataset, clean_correct, robust)``."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def update(self, dataset: str, clean_correct: Iterable[bool], robust: Iterable[bool]) -> "ZeroShotAccuracy":
        cell = self.counts.setdefault(dataset, [0, 0, 0])
        for c, r in zip(clean_correct, robust):
            cell[0] += 1
            cell[1] += bool(c)
            cell[2] += bool(r)
        return self

    def merge(self, other: "ZeroShotAccuracy") -> "ZeroShotAccuracy":
        out = ZeroShotAccuracy({k: list(v) for k, v in self.counts.items()})
        for k, (n, c, r) in other.counts.items():
            cell = out.counts.setdefault(k, [0, 0, 0])
            cell[0] += n
            cell[1] += c
            cell[2] += r
        return out

    def compute(self) -> dict[str, Any]:
        per = {k: {"n": n, "clean_accuracy": c / n, "robust_accuracy": r / n} for k, (n, c, r) in self.counts.items() if n}
        avg = {key: (sum(v[key] for v in per.values()) / len(per) if per else None)
               for key in ("clean_accuracy", "robust_accuracy")}
        return {"datasets": per, "average": avg}


def confusion_counts(pred: Any, labels: Any, num_classes: int) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Per sample of per-pixel predictions and labels (tensors (N, H, W)): correct pixels, and per
    class the intersection (pixels predicted c and labelled c) and union (predicted c or labelled c)
    counts, the additive state of :class:`SegmentationScore`."""
    import torch

    n = pred.shape[0]
    p, t = pred.reshape(n, -1).long(), labels.reshape(n, -1).long()
    correct = (p == t).sum(dim=1)
    offsets = torch.arange(n, device=p.device)[:, None] * num_classes
    hist = lambda v: torch.bincount((v + offsets).flatten(), minlength=n * num_classes).view(n, num_classes)  # noqa: E731
    same = p == t
    inter = torch.zeros(n, num_classes, dtype=torch.long, device=p.device)
    inter.scatter_add_(1, t, same.long())  # each correctly labelled pixel counts for its class
    pred_count, label_count = hist(p), hist(t)
    union = pred_count + label_count - inter
    return correct.tolist(), inter.tolist(), union.tolist()


def class_recalls(correct: Any, labels: Any, num_classes: int | None = None) -> list[float | None]:
    """Per class, the share of its samples that are ``correct`` (recall); None for a class without
    samples. ``correct``: per-sample booleans (clean or robust); ``labels``: true classes."""
    import torch

    ok = torch.as_tensor(correct).flatten().float()
    y = torch.as_tensor(labels).flatten().long()
    if ok.shape != y.shape:
        raise ValueError(f"{ok.numel()} outcomes for {y.numel()} labels")
    k = int(num_classes if num_classes is not None else (int(y.max()) + 1 if y.numel() else 0))
    n = torch.bincount(y, minlength=k)
    hit = torch.bincount(y, weights=ok, minlength=k)
    return [float(h / c) if c else None for h, c in zip(hit.tolist(), n.tolist())]


def balanced_accuracy(correct: Any, labels: Any, num_classes: int | None = None) -> float:
    """The mean over the classes that have samples of their recall (:func:`class_recalls`): a model
    that gives up some classes for others scores lower than its plain accuracy says."""
    recalls = [r for r in class_recalls(correct, labels, num_classes) if r is not None]
    if not recalls:
        raise ValueError("balanced accuracy of no samples")
    return sum(recalls) / len(recalls)


def largest_class_share(pred: Any, num_classes: int | None = None) -> tuple[int, float]:
    """(class, share) of the class predicted most often among ``pred`` (ties: the lower class): 1/K
    for evenly spread predictions, 1.0 for a model that predicts one class for everything."""
    import torch

    p = torch.as_tensor(pred).flatten().long()
    if not p.numel():
        raise ValueError("largest class share of no predictions")
    counts = torch.bincount(p, minlength=int(num_classes or 0))
    c = int(counts.argmax())
    return c, float(counts[c]) / p.numel()


@dataclass
class SegmentationScore(Metric):
    """Pixel accuracy and mean intersection-over-union of per-pixel predictions, for several views of
    the same samples (``clean``, ``adversarial``, ...). ``update(view, pixels, correct, intersection,
    union)`` with per-sample sequences (pixels, correctly labelled pixels, and per class the
    intersection and union counts of :func:`confusion_counts`). The counts add over pixels, so the
    numbers are those of the whole data set however it was split: pixel accuracy = correct / pixels;
    IoU_c = sum intersection_c / sum union_c over the classes that occur (predicted or labelled,
    union > 0); mIoU = their mean."""

    num_classes: int = 0
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _cell(self, view: str) -> dict[str, Any]:
        return self.counts.setdefault(view, {"n": 0, "pixels": 0, "correct": 0, "inter": [0] * self.num_classes,
                                             "union": [0] * self.num_classes})

    def update(self, view: str, pixels: Iterable[int], correct: Iterable[int], intersection: Iterable[Sequence[int]],
               union: Iterable[Sequence[int]]) -> "SegmentationScore":
        cell = self._cell(view)
        for px, c, i, u in zip(pixels, correct, intersection, union):
            if len(i) != self.num_classes or len(u) != self.num_classes:
                raise ValueError(f"per-class counts need {self.num_classes} entries, got {len(i)} and {len(u)}")
            cell["n"] += 1
            cell["pixels"] += int(px)
            cell["correct"] += int(c)
            cell["inter"] = [a + int(b) for a, b in zip(cell["inter"], i)]
            cell["union"] = [a + int(b) for a, b in zip(cell["union"], u)]
        return self

    def merge(self, other: "SegmentationScore") -> "SegmentationScore":
        if self.num_classes != other.num_classes:
            raise ValueError("segmentation scores over different numbers of classes do not merge")
        out = SegmentationScore(self.num_classes)
        for src in (self.counts, other.counts):
            for view, c in src.items():
                cell = out._cell(view)
                for key in ("n", "pixels", "correct"):
                    cell[key] += c[key]
                cell["inter"] = [a + b for a, b in zip(cell["inter"], c["inter"])]
                cell["union"] = [a + b for a, b in zip(cell["union"], c["union"])]
        return out

    def compute(self) -> dict[str, Any]:
        """Per view: n, pixel_accuracy, mean_iou, iou (per class; None for a class that never occurs)."""
        out = {}
        for view, c in self.counts.items():
            iou = [i / u if u else None for i, u in zip(c["inter"], c["union"])]
            present = [v for v in iou if v is not None]
            out[view] = {"n": c["n"], "pixel_accuracy": c["correct"] / c["pixels"] if c["pixels"] else None,
                         "mean_iou": sum(present) / len(present) if present else None, "iou": iou}
        return out


def merge_all(metrics: Sequence[Metric]) -> Metric:
    """One state from many (batches, sessions, ranks)."""
    out = metrics[0]
    for m in metrics[1:]:
        out = out.merge(m)
    return out
