"""The leaderboard: complete runs of a results store, grouped by (dataset, norm, eps) and ranked by
robust accuracy (then clean accuracy).

Only runs under the same threat model on the same dataset are comparable, so each group is ranked on
its own. Runs evaluated on fewer samples or with a weaker attack list are still listed; every row shows
its ``n`` and its attacks (and notes such as failed sanity checks or a randomized model) so readers can
judge how much a number is worth.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.report.plots import format_eps, format_percent, norm_name
from robustlab.eval.store import ResultsStore


@dataclass
class LeaderboardRow:
    """One complete run in a leaderboard group. Accuracies are fractions in [0, 1]."""

    rank: int
    run_id: str
    model: str
    robust_accuracy: float
    clean_accuracy: float | None
    attacks: str              # attack names in the order they ran, joined with '+'
    n: int
    created: str
    split: str = ""
    notes: list[str] = field(default_factory=list)   # failed/warned sanity checks, randomized model, ...


@dataclass
class LeaderboardGroup:
    """All complete runs on one dataset under one threat model (norm, eps), best first."""

    dataset: str
    norm: str
    eps: float
    rows: list[LeaderboardRow]

    @property
    def title(self) -> str:
        return f"{self.dataset} · {norm_name(self.norm)} ε = {format_eps(self.norm, self.eps)}"


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
    defenses = (run.get("config") or {}).get("defenses")
    if defenses:
        notes.append("defended: " + "+".join(str(d.get("name")) for d in defenses))
    return notes


def _eps_key(eps: float) -> float:
    """Epsilons equal up to float noise (8/255 computed two ways) fall in the same group."""
    return float(f"{float(eps):.9g}")


def leaderboard(store: ResultsStore) -> list[LeaderboardGroup]:
    """Group the store's complete runs by (dataset, norm, eps) and rank each group.

    Order within a group: robust accuracy (descending), then clean accuracy (descending), then more
    samples, then the older run. Equal (robust, clean) accuracies share a rank ("1, 1, 3").
    Groups are sorted by dataset, norm and eps. Runs that are not complete are left out.
    """
    buckets: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in store.list_runs():
        summary = run.get("summary") or {}
        if run.get("status") != "complete" or run.get("protocol") != "adversarial" or summary.get("robust_accuracy") is None:
            continue
        run.update(robust_accuracy=summary["robust_accuracy"], clean_accuracy=summary.get("clean_accuracy"))
        threat = summary.get("threat") or run["config"]
        key = (str(run["dataset"]), str(threat["norm"]), _eps_key(threat["eps"]))
        buckets.setdefault(key, []).append(run)

    groups = []
    for (dataset, norm, eps), runs in sorted(buckets.items()):
        runs.sort(key=lambda r: (
            -float(r["robust_accuracy"]),
            -float(r["clean_accuracy"]) if r.get("clean_accuracy") is not None else 1.0,
            -int(r["n"]),
            str(r["created"]),
        ))
        rows: list[LeaderboardRow] = []
        for position, run in enumerate(runs, start=1):
            attacks = store.get_run(run["run_id"])["attacks"]
            rank = position
            if rows and (rows[-1].robust_accuracy, rows[-1].clean_accuracy) == (
                float(run["robust_accuracy"]), run.get("clean_accuracy")
            ):
                rank = rows[-1].rank
            rows.append(LeaderboardRow(
                rank=rank, run_id=run["run_id"], model=str(run["model"]),
                robust_accuracy=float(run["robust_accuracy"]), clean_accuracy=run.get("clean_accuracy"),
                attacks="+".join(a["name"] for a in attacks), n=int(run["n"]), created=str(run["created"]),
                split=str(run.get("split", "")), notes=_notes(run),
            ))
        groups.append(LeaderboardGroup(dataset=dataset, norm=norm, eps=eps, rows=rows))
    return groups


_COLUMNS = ("rank", "run", "model", "robust", "clean", "n", "split", "attacks", "created (UTC)", "notes")


def _cells(row: LeaderboardRow) -> list[str]:
    return [
        str(row.rank), row.run_id, row.model, format_percent(row.robust_accuracy), format_percent(row.clean_accuracy),
        str(row.n), row.split, row.attacks or "(none)", _short_time(row.created), "; ".join(row.notes),
    ]


def _short_time(created: str) -> str:
    """``2026-01-02T03:04:05+00:00 -> '2026-01-02 03:04'`` (times in the store are UTC)."""
    return created[:16].replace("T", " ") if len(created) >= 16 and created[10:11] == "T" else created


def format_leaderboard(groups: list[LeaderboardGroup], max_model_width: int = 40) -> str:
    """A plain-text, fixed-width table per group for the terminal; accuracies in percent with 2 decimals.

    Model names longer than ``max_model_width`` characters are shortened with an ellipsis.
    """
    if not groups:
        return "No complete runs in the results store yet.\n"
    numeric = {"rank", "robust", "clean", "n"}
    out = []
    for group in groups:
        cells = []
        for row in group.rows:
            c = _cells(row)
            if len(c[2]) > max_model_width:
                c[2] = c[2][: max_model_width - 1] + "…"
            cells.append(c)
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_COLUMNS)]
        has_notes = any(c[-1] for c in cells)
        ncols = len(_COLUMNS) if has_notes else len(_COLUMNS) - 1

        def line(values: list[str]) -> str:
            parts = [v.rjust(widths[i]) if _COLUMNS[i] in numeric else v.ljust(widths[i])
                     for i, v in enumerate(values[:ncols])]
            return "  ".join(parts).rstrip()

        header = f"{group.title}  ({len(group.rows)} run{'s' if len(group.rows) != 1 else ''})"
        out.append(header)
        out.append("=" * len(header))
        out.append(line(list(_COLUMNS)))
        out.append("  ".join("-" * widths[i] for i in range(ncols)))
        out.extend(line(c) for c in cells)
        out.append("")
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1200px; margin: 0 auto; padding: 24px; font-size: 15px; }
h1 { font-size: 26px; } h2 { font-size: 19px; margin-top: 30px; }
table { border-collapse: collapse; margin: 8px 0 18px 0; }
th, td { border: 1px solid #d5d5dc; padding: 5px 10px; text-align: left; }
th { background: #f3f3f7; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.note { color: #8e0000; font-size: 13px; }
tr.first td { background: #f1faf2; }
.muted { color: #666; font-size: 13px; }
"""


def write_leaderboard_html(groups: list[LeaderboardGroup], path: str | Path) -> Path:
    """Write the leaderboard as one self-contained HTML page (inline CSS, no scripts); returns its path."""
    e = html.escape
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>robustlab leaderboard</title>'
        f"<style>{_CSS}</style></head><body><h1>robustlab leaderboard</h1>",
        '<p class="muted">Complete runs, grouped by dataset and threat model and ranked by robust accuracy, then '
        "clean accuracy. Numbers from fewer samples or weaker attack lists are less reliable: check <em>n</em> "
        "and <em>attacks</em>.</p>",
    ]
    if not groups:
        parts.append("<p>No complete runs in the results store yet.</p>")
    for group in groups:
        parts.append(f"<h2>{e(group.title)}</h2>")
        parts.append(
            '<table><tr><th class="num">rank</th><th>run</th><th>model</th><th class="num">robust accuracy</th>'
            '<th class="num">clean accuracy</th><th class="num">n</th><th>split</th><th>attacks</th>'
            "<th>created (UTC)</th><th>notes</th></tr>"
        )
        for row in group.rows:
            parts.append(
                f'<tr class="{"first" if row.rank == 1 else ""}"><td class="num">{row.rank}</td>'
                f"<td><code>{e(row.run_id)}</code></td><td>{e(row.model)}</td>"
                f'<td class="num"><strong>{format_percent(row.robust_accuracy)}</strong></td>'
                f'<td class="num">{format_percent(row.clean_accuracy)}</td><td class="num">{row.n}</td>'
                f"<td>{e(row.split)}</td><td>{e(row.attacks or '(none)')}</td><td>{e(_short_time(row.created))}</td>"
                f'<td class="note">{e("; ".join(row.notes))}</td></tr>'
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
