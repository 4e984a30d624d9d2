"""The structured protocol: threat models that are not an Lp ball around each image, each evaluated as
its own threat model (:mod:`robustlab.threat_kinds`), batch by batch into the store.

A run holds one task per threat model, named by its spec (``spatial:angle=30,shift=3``,
``universal:norm=linf,eps=0.1``, ``patch:size=4``; :func:`parse_threat` reads them):

- **spatial** (rotations and translations, Engstrom et al. 2019): per-sample worst case over the grid
  search and the first-order attack (only still-robust points attacked next), every counted point
  re-rendered from its (angle, dx, dy) and re-predicted (:func:`robustlab.eval.structured.spatial_batch`).
  Rows keep the transformation that fooled each image.
- **universal** (one perturbation for the whole data set): fitted once per run on training images
  with a seeded generator, kept with the run (the store's ``run_files``) so a resumed run reuses it
  rather than refitting, then applied to every image (checked: in the ball, one perturbation for the
  batch). Summary: robust accuracy and the fooling rate (prediction changed, all images).
- **patch** (a location-free square patch of its own size): fitted and kept like the universal
  perturbation; per image ``draws`` random positions (random-position accuracy) and the worst
  position of a grid (worst-position accuracy, the robust accuracy); rows keep the position that
  fooled it.

Randomness comes from (seed, task, batch) (fits: (seed, task)), so a resumed or sharded run gives the
rows of an uninterrupted one. Per-sample rows go to ``structured_samples``; the summary is computed
from them alone. The leaderboard sees one run per threat model (``leaderboard_views``), each ranked
only among runs of the same threat model.
"""

from __future__ import annotations

import io
import json
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from robustlab.attacks.base import Attack, create_attack
from robustlab.errors import RobustlabError
from robustlab.eval import sanity
from robustlab.eval.metrics import wilson_interval
from robustlab.eval.protocols.base import (
    BatchContext,
    BatchOutput,
    Protocol,
    RunFiles,
    Task,
)
from robustlab.eval.store import ResultsStore
from robustlab.eval.structured import (
    BatchOutcome,
    fit_patch,
    fit_universal,
    patch_batch,
    spatial_batch,
    universal_batch,
)
from robustlab.params import parse_spec
from robustlab.seeding import make_generator
from robustlab.threat_kinds import (
    PatchThreat,
    SpatialThreat,
    UniversalThreat,
    threat_from_dict,
)

_FIT_KEY = zlib.crc32(b"structured-fit")

# Per kind: the threat model's parameters, then its attacks' (defaults; None: required). The spatial
# ``attacks`` are grid, fo or grid+fo (worst case, in that order).
PARAMETERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "spatial": ({"angle": 30.0, "shift": 3.0},
                {"attacks": "grid+fo", "angles": 31, "shifts": 5, "steps": 20, "restarts": 1}),
    "universal": ({"norm": "linf", "eps": None}, {"epochs": 10, "batch_size": 32, "alpha": None}),
    "patch": ({"size": None}, {"epochs": 20, "batch_size": 32, "lr": 0.05, "stride": 2, "draws": 10}),
}
EXAMPLES = "spatial:angle=30,shift=3, universal:norm=linf,eps=0.1, patch:size=4"


def threat_help() -> str:
    """Every kind with its parameters and defaults, for the command's help."""
    parts = []
    for kind, (threat, attack) in PARAMETERS.items():
        keys = [f"{k}={'REQUIRED' if v is None else v}" for k, v in threat.items()]
        keys += [f"{k}={'auto' if v is None else v}" for k, v in attack.items()]
        parts.append(f"{kind}:{','.join(keys)}")
    return "; ".join(parts)


@dataclass
class ThreatSpec:
    """One threat model of a run: its kind, the threat model, the attacks that run in it (patch: the
    one that fits and places it), ``draws`` (patch: random positions per image) and ``name`` (the
    task: kind and the threat model's parameters)."""

    kind: str
    threat: Any
    attacks: list[Attack]
    name: str
    draws: int = 0
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fits = self.kind in ("universal", "patch")

    def config(self) -> dict[str, Any]:
        out = {"kind": self.kind, "name": self.name, "threat": self.threat.to_dict(),
               "attacks": [a.config() for a in self.attacks]}
        if self.kind == "patch":
            out["draws"] = self.draws
        return out

    def check_image(self, shape: tuple[int, ...]) -> None:
        """Refuse a threat model that does not fit images of ``shape`` (C, H, W), in one line."""
        c, h, w = shape[-3:]
        t = self.threat
        if self.kind == "patch":
            t.check_image(h, w)
        elif self.kind == "universal":
            span = t.upper - t.lower
            widest = {"linf": span, "l2": span * math.sqrt(c * h * w), "l1": span * c * h * w}[t.base_norm]
            if t.eps > widest:
                raise RobustlabError(f"{self.name}: eps {t.eps:g} is outside the [{t.lower:g}, {t.upper:g}] pixel box "
                                     f"(no {t.base_norm} perturbation of {c}x{h}x{w} images is larger than "
                                     f"{widest:g}); epsilons are in [0, 1] pixel units (8/255, not 8)")
        elif self.kind == "spatial" and t.max_shift >= max(h, w):
            raise RobustlabError(f"{self.name}: a shift of {t.max_shift:g} pixels moves a {h}x{w} image out of view")


def _number(kind: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RobustlabError(f"threat {kind}: {key} must be a number, got {value!r}")
    return float(value)


def _name(kind: str, threat: dict[str, Any]) -> str:
    return f"{kind}:" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in threat.items())


def parse_threat(spec: str) -> ThreatSpec:
    """A ``--threat`` spec ``KIND:key=value,...`` (kinds and parameters: :data:`PARAMETERS`) as a
    :class:`ThreatSpec`; a bad one raises :class:`RobustlabError` in one line."""
    kind, given = parse_spec(spec, "threat")
    if kind not in PARAMETERS:
        raise RobustlabError(f"unknown threat {kind!r}; use one of {', '.join(PARAMETERS)} (e.g. {EXAMPLES})")
    threat_keys, attack_keys = PARAMETERS[kind]
    unknown = sorted(set(given) - set(threat_keys) - set(attack_keys))
    if unknown:
        raise RobustlabError(f"threat {kind} has no parameter {', '.join(unknown)}; it takes "
                             f"{', '.join([*threat_keys, *attack_keys])}")
    p = {**threat_keys, **attack_keys, **given}
    missing = [k for k, v in p.items() if v is None and k in threat_keys]
    if missing:
        raise RobustlabError(f"threat {kind} needs {', '.join(f'{k}=...' for k in missing)} (e.g. {EXAMPLES})")
    extra = {k: p[k] for k in attack_keys}
    if kind == "spatial":
        threat = SpatialThreat(_number(kind, "angle", p["angle"]), _number(kind, "shift", p["shift"]))
        names = [a.strip() for a in str(p["attacks"]).split("+") if a.strip()]
        bad = [a for a in names if a not in ("grid", "fo")]
        if not names or bad or len(set(names)) != len(names):
            raise RobustlabError(f"threat spatial: attacks must be grid, fo or grid+fo, got {p['attacks']!r}")
        made = {"grid": lambda: create_attack("spatial-grid", threat, angles=extra["angles"], shifts=extra["shifts"]),
                "fo": lambda: create_attack("spatial-fo", threat, steps=extra["steps"], restarts=extra["restarts"])}
        attacks = [made[a]() for a in names]
        name = _name(kind, {"angle": threat.max_angle, "shift": threat.max_shift})
        return ThreatSpec(kind, threat, attacks, name)
    if kind == "universal":
        threat = UniversalThreat(str(p["norm"]), _number(kind, "eps", p["eps"]))
        attack = create_attack("uap", threat, epochs=extra["epochs"], batch_size=extra["batch_size"], alpha=extra["alpha"])
        return ThreatSpec(kind, threat, [attack], _name(kind, {"norm": threat.base_norm, "eps": threat.eps}))
    size = p["size"]
    threat = PatchThreat(size)
    draws = extra.pop("draws")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise RobustlabError(f"threat patch: draws must be a whole number >= 1, got {draws!r}")
    attack = create_attack("patch", threat, **extra)
    return ThreatSpec(kind, threat, [attack], _name(kind, {"size": threat.size}), draws=draws)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().float().numpy(), allow_pickle=False)
    return buf.getvalue()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def fit_file(task: str) -> str:
    """The run file of a task's fitted perturbation or patch (its record: ``fit_file(task) + ':record'``)."""
    return f"fit:{task}"


def fit_generator(seed: int, task: str) -> torch.Generator:
    """The generator a run's fit of ``task`` draws from (CPU: the fits draw their orders there)."""
    return make_generator(seed, _FIT_KEY, zlib.crc32(task.encode()))


def batch_generator(seed: int, task: str, batch_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator batch ``batch_index`` of ``task`` draws from (= ``BatchContext.generator()``)."""
    return make_generator(seed, zlib.crc32(task.encode()), batch_index, device=device)


class StructuredProtocol(Protocol):
    name = "structured"
    sample_table = "structured_samples"
    sample_columns = (
        ("label", "INTEGER NOT NULL"),
        ("clean_pred", "INTEGER NOT NULL"),
        ("clean_correct", "INTEGER NOT NULL"),
        ("robust", "INTEGER NOT NULL"),     # correct clean and not broken under this threat model
        ("adv_pred", "INTEGER"),            # prediction on the counted adversarial image (NULL: not attacked)
        ("broken_by", "TEXT"),              # the attack that broke it (verified), NULL if none
        ("attack_preds", "TEXT NOT NULL"),  # JSON {attack: prediction on its own image}
        ("angle", "REAL"),                  # spatial: the transformation that fooled it (degrees, pixels)
        ("dx", "REAL"),
        ("dy", "REAL"),
        ("patch_row", "INTEGER"),           # patch: the worst-case position that fooled it (top-left corner)
        ("patch_col", "INTEGER"),
        ("random_correct", "INTEGER"),      # patch: random positions left correct (of the task's draws)
        ("fooled", "INTEGER"),              # universal: prediction changed by the perturbation
        ("gradients", "INTEGER NOT NULL"),
        ("forwards", "INTEGER NOT NULL"),
        ("seconds", "REAL NOT NULL"),
    )

    def __init__(self, threats: list[ThreatSpec], image_shape: tuple[int, ...],
                 fit: tuple[torch.Tensor, torch.Tensor] | None = None, fit_source: str = "") -> None:
        if not threats:
            raise RobustlabError(f"give at least one threat model (e.g. {EXAMPLES})")
        names = [t.name for t in threats]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RobustlabError(f"threat model {twice[0]} is given twice; give each once")
        for t in threats:
            t.check_image(tuple(image_shape))
        fitting = [t.name for t in threats if t.fits]
        if fitting and (fit is None or len(fit[1]) == 0):
            raise RobustlabError(f"{fitting[0]} is fitted on training images, and none were given")
        self.threats = threats
        self.fit_data = fit if fitting else None
        self.fit_source = fit_source
        self.fitted: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        fit = None if self.fit_data is None else {"source": self.fit_source, "n": len(self.fit_data[1])}
        return {"threats": [t.config() for t in self.threats],
                "attacks": [a.config() for t in self.threats for a in t.attacks], "fit": fit}

    def attack_records(self) -> list[dict[str, Any]]:
        return [{**a.config(), "targeted": False, "minimum_norm": False} for t in self.threats for a in t.attacks]

    def plan(self, n: int, image_dim: int) -> list[Task]:
        return [Task(t.name, t.kind, n, {"threat": t.threat.to_dict()}, work=t) for t in self.threats]

    def prepare(self, model: nn.Module, files: RunFiles, seed: int, device: torch.device,
                log: Callable[[str], None] = lambda msg: None) -> None:
        """Each universal perturbation and patch: read from the run's files, or fitted (seeded) on the
        fit images and kept there."""
        for t in self.threats:
            if not t.fits:
                continue
            what = "perturbation" if t.kind == "universal" else "patch"
            kept = files.get(fit_file(t.name))
            if kept is not None:
                self.fitted[t.name] = _bytes_tensor(kept).to(device)
                log(f"robustlab: {t.name}: using the {what} fitted when this run started")
                continue
            x, y = self.fit_data
            log(f"robustlab: {t.name}: fitting the {what} on {len(y)} training images")
            fit = fit_universal if t.kind == "universal" else fit_patch
            value, record = fit(model, t.attacks[0], x.to(device), y.to(device), fit_generator(seed, t.name))
            files.put(fit_file(t.name) + ":record", json.dumps(record).encode())
            files.put(fit_file(t.name), _tensor_bytes(value))  # last: its presence means the fit is complete
            self.fitted[t.name] = _bytes_tensor(_tensor_bytes(value)).to(device)  # exactly what a resume reads

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> BatchOutput:
        t0 = time.perf_counter()
        spec: ThreatSpec = ctx.task.work
        if spec.kind == "spatial":
            out = spatial_batch(model, spec.attacks, x, y, ctx.generator(), ctx.status)
        elif spec.kind == "universal":
            out = universal_batch(model, spec.threat, self.fitted[spec.name], x, y, spec.attacks[0].name)
        else:
            gen = batch_generator(ctx.seed, spec.name, ctx.batch_index)  # positions are drawn on the CPU
            out = patch_batch(model, spec.attacks[0], self.fitted[spec.name], x, y, spec.draws, gen, ctx.status)
        per = (time.perf_counter() - t0) / max(1, len(y))
        return BatchOutput(_rows(out, ctx.start, y, per), out.costs, out.rejected)

    def final_checks(self, model: nn.Module, probe_x: torch.Tensor, probe_y: torch.Tensor,
                     info: dict[str, Any], seed: int, device: torch.device) -> list[dict[str, str]]:
        return sanity.mode_verdicts(info)

    # ------------------------------------------------------------------ numbers from the store

    @classmethod
    def summarize(cls, store: ResultsStore, run: dict[str, Any], checks: list[dict[str, str]] | None = None) -> dict[str, Any]:
        config, run_id = run["config"], run["run_id"]
        stats = store.batch_stats(run_id)
        threats: dict[str, Any] = {}
        clean = None
        for spec in config["threats"]:
            name = spec["name"]
            rows = store.sample_rows(cls.sample_table, run_id, name)
            entry = _threat_summary(spec, rows, stats.get(name, {}).get("rejected", 0))
            record = store.load_file(run_id, fit_file(name) + ":record")
            if record is not None:
                entry["fit"] = {**(config.get("fit") or {}), **json.loads(record)}
            costs = store.attack_costs(run_id, name)
            entry["seconds"] = round(sum(c["seconds"] for c in costs), 3)
            threats[name] = entry
            if clean is None and rows:
                clean = entry["clean_accuracy"]
        done = min((t["n"] for t in threats.values()), default=0)
        summary = {
            "protocol": cls.name, "model": run["model"], "dataset": run["dataset"], "split": run["split"],
            "n": done, "clean_accuracy": clean,
            "robust_accuracy": {k: t["robust_accuracy"] for k, t in threats.items()},
            "threats": threats, "fit": config.get("fit"),
            "seconds": round(sum(t["seconds"] for t in threats.values()), 3),
        }
        if run.get("status") != "complete" and done < run["n"]:
            summary.update(done=done, partial=True)
        return summary

    @classmethod
    def leaderboard_views(cls, run: dict[str, Any]) -> list[dict[str, Any]]:
        """One run per threat model: its summary (robust accuracy first, the number it ranks by) and
        a config with only its threat model and attacks."""
        s, config = run["summary"], run["config"]
        views = []
        for spec in config["threats"]:
            t = (s.get("threats") or {}).get(spec["name"])
            if t is None:
                continue
            keys = ("robust_accuracy", "random_position_accuracy", "clean_accuracy", "fooling_rate")
            summary = {"protocol": cls.name, "model": s.get("model"), "dataset": s.get("dataset"),
                       "split": s.get("split"), **{k: t[k] for k in keys if k in t}, "n": t["n"],
                       "threat": spec["threat"], "threat_name": spec["name"]}
            views.append({**run, "summary": summary,
                          "config": {**config, "threats": [spec], "attacks": spec["attacks"]}})
        return views

    @classmethod
    def leaderboard_group(cls, run: dict[str, Any]) -> tuple[tuple, str]:
        """(data set, the threat model): a run ranks only among runs of the same threat model."""
        spec = run["config"]["threats"][0]
        return ((run["dataset"], cls.name, spec["name"]),
                f"{run['dataset']} · {threat_from_dict(spec['threat'])}")

    @classmethod
    def leaderboard_strength(cls, run: dict[str, Any]) -> list[str]:
        """Attacks weaker than the defaults: no grid search at the paper's density (spatial), fewer
        fit epochs or fit images (universal, patch), a coarser position grid or fewer draws (patch)."""
        spec = run["config"]["threats"][0]
        attacks = {a["name"]: a.get("params") or {} for a in spec["attacks"]}
        defaults = PARAMETERS[spec["kind"]][1]
        out = []
        if spec["kind"] == "spatial":
            grid = attacks.get("spatial-grid")
            if grid is None or grid.get("angles", 0) < defaults["angles"] or grid.get("shifts", 0) < defaults["shifts"]:
                out.append(f"no grid search of at least {defaults['angles']} angles x {defaults['shifts']} shifts")
            return out
        params = next(iter(attacks.values()))
        if params.get("epochs", 0) < defaults["epochs"]:
            out.append(f"fitted for {params.get('epochs')} epochs (< {defaults['epochs']})")
        fit_n = (run["config"].get("fit") or {}).get("n") or 0
        if fit_n < 1000:
            out.append(f"fitted on {fit_n} training images (< 1,000)")
        if spec["kind"] == "patch":
            if params.get("stride", 99) > defaults["stride"]:
                out.append(f"worst position on a grid of stride {params.get('stride')} (> {defaults['stride']})")
            if spec.get("draws", 0) < defaults["draws"]:
                out.append(f"{spec.get('draws')} random positions per image (< {defaults['draws']})")
        return out


def _rows(out: BatchOutcome, start: int, y: torch.Tensor, seconds: float) -> list[tuple]:
    rows = []
    for i in range(len(y)):
        angle = dx = dy = row = col = None
        if out.spatial is not None and not math.isnan(float(out.spatial[i, 0])):
            angle, dx, dy = (float(v) for v in out.spatial[i])
        if out.position is not None and int(out.position[i, 0]) >= 0:
            row, col = int(out.position[i, 0]), int(out.position[i, 1])
        rows.append((
            start + i, int(y[i]), int(out.clean_pred[i]), int(out.correct[i]), int(out.robust[i]), out.adv_pred[i],
            out.broken_by[i], json.dumps(out.attack_preds[i], sort_keys=True), angle, dx, dy, row, col,
            None if out.random_correct is None else int(out.random_correct[i]),
            None if out.fooled is None else int(out.fooled[i]),
            int(out.gradients[i]), int(out.forwards[i]), seconds,
        ))
    return rows


def _threat_summary(spec: dict[str, Any], rows: list[Any], rejected: int) -> dict[str, Any]:
    """One threat model's numbers from its rows."""
    n = len(rows)
    correct = sum(r["clean_correct"] for r in rows)
    robust = sum(r["robust"] for r in rows)
    acc = robust / n if n else None
    clean = correct / n if n else None
    broken: dict[str, int] = {}
    for r in rows:
        if r["broken_by"] is not None:
            broken[r["broken_by"]] = broken.get(r["broken_by"], 0) + 1
    entry: dict[str, Any] = {
        "kind": spec["kind"], "threat": spec["threat"], "attacks": [a["name"] for a in spec["attacks"]], "n": n,
        "robust_accuracy": acc, "clean_accuracy": clean, "broken_by": broken, "rejected": rejected,
        "ci95": {"clean": wilson_interval(clean, n), "robust": wilson_interval(acc, n)},
    }
    if spec["kind"] == "universal":
        entry["fooling_rate"] = sum(r["fooled"] for r in rows) / n if n else None
    elif spec["kind"] == "patch":
        draws = spec["draws"]
        entry["random_position_accuracy"] = sum(r["random_correct"] for r in rows) / (draws * n) if n else None
        entry["worst_position_accuracy"] = acc
        entry["draws"] = draws
    else:
        fooled = [r for r in rows if r["angle"] is not None]
        if fooled:
            entry["median_fooling"] = {k: float(np.median([abs(r[k]) for r in fooled])) for k in ("angle", "dx", "dy")}
    return entry
