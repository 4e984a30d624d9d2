"""The leaderboard: a results store's complete runs, one entry per model, ranked only among comparable
evaluations.

- **One model, one entry.** A model is identified by the sha256 of its weights (recorded from its card
  or weights file) together with the defenses in front of it (and the batch-norm branch of a dual-BN
  model); the names it was evaluated under are its aliases. Without a recorded hash the name is all
  there is, and the entry says so.
- **Groups.** Runs are comparable when they share the protocol, the split, the data's fingerprint
  (image folders: which files) and the protocol's ``leaderboard_group`` key (the adversarial
  protocol: data set, norm, epsilon). A run of several threat models (structured) is one run per
  threat model here (``leaderboard_views``), each ranked only in its own group.
- **Full evaluations rank; weaker ones are shown, marked, never ranked.** A run is a full evaluation
  when its protocol finds nothing missing (``leaderboard_strength``: e.g. at least the standard attack
  ensemble) and it covers as many samples as the largest such run of its group. Each model's entry in
  a group shows its most conservative full evaluation (robust accuracy is an upper bound: the lowest
  found is the honest one); a model with none shows its strongest partial one, marked, below every
  ranked entry.
- **Columns** are the protocol's ``leaderboard_columns`` read from each run's stored summary, so new
  protocols appear without changes here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from robustlab.eval.protocols import PROTOCOLS, Protocol
from robustlab.eval.store import ResultsStore
from robustlab.report.plots import format_eps, format_percent, norm_name


@dataclass
class RunEntry:
    """One complete run as the leaderboard sees it. ``metrics``: the group's columns (None: missing)."""

    run_id: str
    model_id: str
    name: str                  # the model spec it was evaluated under
    protocol: str
    group_key: str
    metrics: dict[str, float | None]
    n: int
    split: str
    dataset: str
    attacks: str               # attack names in the order they ran, joined with '+' ('' if none)
    created: str
    finished: str
    weaker: list[str]          # why it is not a full-strength evaluation (protocol's reasons)
    notes: list[str]           # failed/warned checks, randomized model, defenses, declared strength
    summary: dict[str, Any] = field(repr=False, default_factory=dict)
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    model_info: dict[str, Any] = field(repr=False, default_factory=dict)
    checks: list[dict[str, Any]] = field(repr=False, default_factory=list)
    full: bool = False         # set by the group: full strength and as many samples as the group's most
    marks: list[str] = field(default_factory=list)  # weaker + fewer samples: why it is not ranked

    @property
    def unreliable(self) -> bool:
        """A failed sanity check (gradient masking suspected)."""
        return any(str(c.get("status")) == "fail" for c in self.checks)


@dataclass
class LeaderboardRow:
    """One model in one group: its entry run (the one shown), its rank (None: not ranked) and all its
    runs of the group, entry first."""

    rank: int | None
    model_id: str
    model: str                 # display name (the first alias)
    entry: RunEntry
    runs: list[RunEntry]

    # Shortcuts to the entry run.
    @property
    def run_id(self) -> str:
        return self.entry.run_id

    @property
    def n(self) -> int:
        return self.entry.n

    @property
    def attacks(self) -> str:
        return self.entry.attacks

    @property
    def notes(self) -> list[str]:
        return self.entry.marks + self.entry.notes

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.entry.metrics

    def __getattr__(self, name: str) -> Any:  # row.robust_accuracy, row.clean_accuracy, ...
        entry = self.__dict__.get("entry")
        if entry is not None and name in entry.metrics:
            return entry.metrics[name]
        raise AttributeError(name)


@dataclass
class LeaderboardGroup:
    """Every model evaluated on one comparable setting, ranked entries first (best first), then the
    unranked ones. ``columns``: the protocol's summary keys shown ("-key": lower is better)."""

    key: str
    protocol: str
    dataset: str
    split: str
    title: str
    columns: tuple[str, ...]
    full_n: int
    rows: list[LeaderboardRow]

    @cached_property
    def ranked(self) -> int:
        """How many rows have a rank."""
        return sum(r.rank is not None for r in self.rows)


@dataclass
class ModelEntry:
    """One model across the whole store: identity, aliases and its runs (every group)."""

    model_id: str
    sha256: str | None
    defenses: list[dict[str, Any]]
    bn_branch: str | None
    names: list[str]
    card: dict[str, Any] | None
    runs: list[RunEntry]

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class Leaderboard:
    groups: list[LeaderboardGroup]
    models: dict[str, ModelEntry]


# ---------------------------------------------------------------------- identity

def _defenses(run: dict[str, Any]) -> list[dict[str, Any]]:
    config, info = run.get("config") or {}, run.get("model_info") or {}
    return list(config.get("defenses") or info.get("defenses") or [])


def _sha256(run: dict[str, Any]) -> str | None:
    config, info = run.get("config") or {}, run.get("model_info") or {}
    card = info.get("card") or {}
    value = config.get("model_sha256") or card.get("sha256") or info.get("weights_sha256")
    return str(value).lower() if value else None


def model_identity(run: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model id, identity): the weights' sha256 (else the model name), the defenses and the BN
    branch. The id is the first 12 hex digits of the identity's hash, stable across stores."""
    sha = _sha256(run)
    identity = {
        "weights_sha256": sha,
        "name": None if sha else str(run.get("model")),
        "defenses": _defenses(run),
        "bn_branch": (run.get("config") or {}).get("bn_branch"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:12], identity


# ---------------------------------------------------------------------- reading runs

def columns_of(protocol: type[Protocol], summaries: list[dict[str, Any]]) -> tuple[str, ...]:
    """The protocol's leaderboard columns, or every number named *accuracy* its summaries hold; a column
    whose values are maps of numbers becomes one column per key, ``name@key`` (keys in first-seen order)."""
    if protocol.leaderboard_columns:
        out: list[str] = []
        for col in protocol.leaderboard_columns:
            name = col.lstrip("-")
            keys = {k: None for s in summaries if isinstance(s.get(name), dict) for k in s[name]}
            out += [f"{col}@{k}" for k in keys] if keys else [col]
        return tuple(out)
    seen: dict[str, None] = {}
    for s in summaries:
        for k, v in s.items():
            if k.endswith("accuracy") and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(k)
    return tuple(seen)


def metric_of(summary: dict[str, Any], column: str) -> float | None:
    """A column's number in a run's summary (``name@key``: an entry of a map)."""
    name, _, key = column.lstrip("-").partition("@")
    value = summary.get(name)
    if key:
        value = value.get(key) if isinstance(value, dict) else None
    return _number(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def _notes(run: dict[str, Any]) -> list[str]:
    notes = []
    checks = run.get("checks") or []
    for status in ("fail", "warn"):
        names = [str(c.get("name")) for c in checks if str(c.get("status")) == status]
        if names:
            notes.append(f"check {status}: {', '.join(names)}")
    info = run.get("model_info") or {}
    if info.get("randomized"):
        notes.append("randomized model")
    defenses = _defenses(run)
    if defenses:
        notes.append("defended: " + "+".join(str(d.get("name")) for d in defenses))
    declared = (run.get("config") or {}).get("declared_strength")
    if isinstance(declared, dict):
        notes.append(f"declared at least {declared.get('at_least')}: {declared.get('reason', '')}".rstrip(": "))
    return notes


def group_title(run: dict[str, Any], protocol: type[Protocol], title: str) -> str:
    """The protocol's title, or one built from the data set and the summary's threat model."""
    if title:
        return title
    threat = (run.get("summary") or {}).get("threat") or {}
    if "norm" in threat and "eps" in threat:
        text = f"{run['dataset']} · {norm_name(threat['norm'])} ε = {format_eps(threat['norm'], threat['eps'])}"
    else:
        text = f"{run['dataset']} · {protocol.name}"
    return text if run.get("split", "test") == "test" else f"{text} ({run['split']})"


def _score(entry: RunEntry, columns: tuple[str, ...]) -> tuple[float, ...]:
    """Higher is better, column by column (missing values rank last)."""
    out = []
    for col in columns:
        value = entry.metrics.get(col.lstrip("-"))
        out.append(-math.inf if value is None else (-value if col.startswith("-") else value))
    return tuple(out)


def build_leaderboard(store: ResultsStore) -> Leaderboard:
    """Read every complete run of the store once and build the groups and the model entries."""
    runs = [r for r in store.list_runs() if r.get("status") == "complete" and r.get("summary")
            and r.get("protocol") in PROTOCOLS]
    buckets: dict[str, list[tuple[dict[str, Any], str]]] = {}
    titles: dict[str, str] = {}
    models: dict[str, ModelEntry] = {}
    for run in runs:
        if "attacks" not in run["config"]:  # written without them in the config: the store's attack table
            run["config"] = {**run["config"], "attacks": [{k: a[k] for k in ("name", "params", "targeted")}
                                                          for a in store.get_run(run["run_id"])["attacks"]]}
        protocol = PROTOCOLS[run["protocol"]]
        for view in protocol.leaderboard_views(run):  # a run of several threat models: one view each
            key, title = protocol.leaderboard_group(view)
            data = view["config"].get("data_fingerprint")  # image folders: which files (two folders are two data sets)
            gkey = json.dumps([view["protocol"], view.get("split", ""), data, *key], default=str)
            buckets.setdefault(gkey, []).append((view, gkey))
            titles.setdefault(gkey, group_title(view, protocol, title) + (f" [files {data[:8]}]" if data else ""))

    groups: list[LeaderboardGroup] = []
    for gkey, members in buckets.items():
        protocol = PROTOCOLS[members[0][0]["protocol"]]
        columns = columns_of(protocol, [r["summary"] for r, _ in members])
        entries = []
        for run, _ in members:
            model_id, identity = model_identity(run)
            summary = run["summary"]
            entry = RunEntry(
                run_id=run["run_id"], model_id=model_id, name=str(run["model"]), protocol=run["protocol"],
                group_key=gkey, metrics={c.lstrip("-"): metric_of(summary, c) for c in columns},
                n=int(summary.get("n") or run["n"]), split=str(run.get("split", "")), dataset=str(run["dataset"]),
                attacks="+".join(str(a.get("name")) for a in run["config"]["attacks"]),
                created=str(run["created"]), finished=str(run.get("finished") or ""),
                weaker=list(protocol.leaderboard_strength(run)), notes=_notes(run), summary=summary,
                config=run["config"], model_info=run.get("model_info") or {}, checks=run.get("checks") or [],
            )
            entries.append(entry)
            model = models.get(model_id)
            if model is None:
                card = (run.get("model_info") or {}).get("card")
                model = models[model_id] = ModelEntry(model_id, identity["weights_sha256"], identity["defenses"],
                                                      identity["bn_branch"], [], card, [])
            if entry.name not in model.names:
                model.names.append(entry.name)
            model.runs.append(entry)
        strong = [e for e in entries if not e.weaker]
        full_n = max(e.n for e in (strong or entries))
        for e in entries:
            e.marks = list(e.weaker)
            if e.n < full_n:
                e.marks.append(f"n = {e.n:,} of the group's {full_n:,}")
            e.full = not e.marks
        groups.append(_rank(gkey, protocol, titles[gkey], columns, full_n, entries, models))
    groups.sort(key=lambda g: (g.dataset, g.protocol, g.title))
    return Leaderboard(groups, models)


def _rank(gkey: str, protocol: type[Protocol], title: str, columns: tuple[str, ...], full_n: int,
          entries: list[RunEntry], models: dict[str, ModelEntry]) -> LeaderboardGroup:
    """One row per model: its entry run is its most conservative full run (lowest score), else its
    strongest partial one (largest n, fewest reasons, then lowest score). Full entries rank by score
    (equal scores share a rank: 1, 1, 3); the others follow unranked."""
    by_model: dict[str, list[RunEntry]] = {}
    for e in entries:
        by_model.setdefault(e.model_id, []).append(e)
    rows = []
    for model_id, runs in by_model.items():
        full = [e for e in runs if e.full]
        if full:
            entry = min(full, key=lambda e: (_score(e, columns), e.created))
        else:
            entry = min(runs, key=lambda e: (-e.n, len(e.weaker), _score(e, columns), e.created))
        others = sorted((e for e in runs if e is not entry), key=lambda e: (not e.full, e.created))
        rows.append(LeaderboardRow(None, model_id, models[model_id].name, entry, [entry, *others]))
    rows.sort(key=lambda r: (not r.entry.full, tuple(-v for v in _score(r.entry, columns)), -r.entry.n,
                             r.entry.created))
    previous = None
    for position, row in enumerate(rows, start=1):
        if not row.entry.full:
            break
        score = _score(row.entry, columns)
        row.rank = previous.rank if previous is not None and _score(previous.entry, columns) == score else position
        previous = row
    first = entries[0]
    return LeaderboardGroup(gkey, protocol.name, first.dataset, first.split, title, columns, full_n, rows)


def leaderboard(store: ResultsStore) -> list[LeaderboardGroup]:
    """The store's groups, each with one row per model (see the module docstring)."""
    return build_leaderboard(store).groups


# ---------------------------------------------------------------------- formatting shared with the site

def column_label(column: str) -> str:
    """``robust_accuracy -> 'robust accuracy'``, ``certified_accuracy@0.5 -> 'certified accuracy r=0.5'``;
    a lower-is-better column gets a down arrow."""
    base, _, key = column.lstrip("-").partition("@")
    name = base.replace("_", " ") + (f" {key}" if key else "")
    return f"{name} ↓" if column.startswith("-") else name


def format_metric(column: str, value: float | None) -> str:
    """Fractions named *accuracy* / *error* / *rate* as percentages, other numbers with 4 digits."""
    if value is None:
        return "—"
    if column.lstrip("-").partition("@")[0].endswith(("accuracy", "error", "rate", "mce")) and -1.0 <= value <= 2.0:
        return format_percent(value)
    return f"{value:.4g}"


def short_time(created: str) -> str:
    """``2026-01-02T03:04:05+00:00 -> '2026-01-02 03:04'`` (times in the store are UTC)."""
    return created[:16].replace("T", " ") if len(created) >= 16 and created[10:11] == "T" else created


def format_leaderboard(groups: list[LeaderboardGroup], max_model_width: int = 40) -> str:
    """A plain-text, fixed-width table per group for the terminal; unranked rows show '-' and why."""
    if not groups:
        return "No complete runs in the results store yet.\n"
    out = []
    for group in groups:
        heads = ["rank", "model", *[column_label(c) for c in group.columns], "n", "runs", "run", "attacks", "notes"]
        numeric = set(range(1)) | set(range(2, 2 + len(group.columns) + 2))
        cells = []
        for row in group.rows:
            name = row.model if len(row.model) <= max_model_width else row.model[: max_model_width - 1] + "…"
            cells.append([
                str(row.rank) if row.rank is not None else "-", name,
                *[format_metric(c, row.entry.metrics.get(c.lstrip("-"))) for c in group.columns],
                str(row.n), str(len(row.runs)), row.run_id, row.attacks or "(none)", "; ".join(row.notes),
            ])
        has_notes = any(c[-1] for c in cells)
        ncols = len(heads) if has_notes else len(heads) - 1
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

        def line(values: list[str], widths: list[int] = widths, numeric: set[int] = numeric, ncols: int = ncols) -> str:
            parts = [v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values[:ncols])]
            return "  ".join(parts).rstrip()

        header = (f"{group.title}  ({len(group.rows)} model{'s' if len(group.rows) != 1 else ''}, {group.ranked} ranked)")
        out += [header, "=" * len(header), line(heads), "  ".join("-" * widths[i] for i in range(ncols))]
        out += [line(c) for c in cells]
        out.append("")
    return "\n".join(out)
