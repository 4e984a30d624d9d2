"""Reports and leaderboard, on a store filled through its public write API with small consistent runs."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from robustlab.eval import ResultsStore
from robustlab.report import (
    format_leaderboard,
    leaderboard,
    plot_eps_curve,
    plot_gallery,
    plot_steps_curve,
    write_report,
    write_site,
)
from robustlab.eval.metrics import wilson_interval
from robustlab.report.plots import ci_text
from robustlab.eval.store import Example, SampleRow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"python": "3.11", "torch": "2.3", "robustlab": "0.1.0", "numpy": "2.0", "device": "cpu", "threads": 2,
       "platform": "linux"}
ATTACKS = [
    {"name": "apgd-ce", "params": {"steps": 100, "restarts": 1}, "targeted": False},
    {"name": "apgd-t", "params": {"steps": 100, "n_target_classes": 9}, "targeted": True},
]


def make_run(
    store: ResultsStore,
    *,
    model: str = "smallcnn",
    dataset: str = "mnist",
    norm: str = "linf",
    eps: float = 0.3,
    n: int = 10,
    n_clean: int = 8,
    broken: tuple[int, ...] = (2, 1),
    attacks: list[dict] | None = None,
    complete: bool = True,
    batches: int = 2,
    checks: list[dict] | None = None,
    model_info: dict | None = None,
    channels: int = 1,
    classes: list[str] | None = None,
) -> str:
    """A run whose per-sample rows, examples and summary agree: of ``n`` samples the first ``n_clean`` are
    classified correctly, attack ``i`` breaks ``broken[i]`` of them (verified), the rest stay robust.
    With ``complete=False`` only the first batch is written and the run is left running."""
    attacks = ATTACKS if attacks is None else attacks
    config = {"model": model, "dataset": dataset, "split": "test", "n": n, "norm": norm, "eps": eps, "seed": 0}
    if classes is not None:
        config["classes"] = classes
    info = {"card": {"name": model, "paper": "Doe et al. 2024", "clean_accuracy_claimed": 0.99},
            "source": "zoo", "eval_mode_forced": [], "randomized": False}
    info.update(model_info or {})
    run_id = store.create_run("adversarial", config, ENV, info, attacks)
    store.add_task(run_id, "main", "main", n, {"eps": eps, "steps": None})

    rng = np.random.default_rng(len(model) + n)
    breaker = [i for i, b in enumerate(broken) for _ in range(b)]
    rows, examples = [], []
    for s in range(n):
        label = s % 10
        correct = s < n_clean
        k = s if correct else None
        by = breaker[k] if k is not None and k < len(breaker) else None
        adv_pred = (label + 1) % 10 if by is not None else None
        rows.append(SampleRow(s, label, label if correct else (label + 3) % 10, correct, correct and by is None, by,
                              adv_pred, eps if by is not None else None, 10 * (by + 1) if by is not None else 50, 60))
        if by is not None:
            clean = rng.random((channels, 8, 8)).astype(np.float32)
            adv = np.clip(clean + eps * rng.choice([-1.0, 1.0], size=clean.shape), 0, 1).astype(np.float32)
            examples.append(Example(s, label, adv_pred, clean, adv))
    per_batch = -(-n // batches)
    written = batches if complete else 1
    for b in range(written):
        lo, hi = b * per_batch, min(n, (b + 1) * per_batch)
        costs = [{"seconds": 1.5, "gradients": 500 * (i + 1), "forwards": 600 * (i + 1)} for i in range(len(attacks))]
        store.write_batch(run_id, "main", b, rows[lo:hi], costs, rejected=1 if b == 0 else 0,
                          examples=[e for e in examples if lo <= e.sample_index < hi])
    if not complete:
        return run_id

    clean_acc = n_clean / n
    robust_left = n_clean
    attack_rows = []
    for i, a in enumerate(attacks):
        robust_left -= broken[i] if i < len(broken) else 0
        attack_rows.append({"index": i, "name": a["name"], "params": a["params"], "robust_accuracy": robust_left / n,
                            "seconds": 1.5 * batches, "gradients": 1000 * (i + 1), "forwards": 1200 * (i + 1),
                            "broken": broken[i] if i < len(broken) else 0})
    robust_acc = robust_left / n
    summary = {
        "run_id": run_id, "model": model, "dataset": dataset, "split": "test", "n": n,
        "threat": {"norm": norm, "eps": eps}, "clean_accuracy": clean_acc, "robust_accuracy": robust_acc,
        "attacks": attack_rows,
        "eps_curve": [{"eps": 0.0, "robust_accuracy": clean_acc}, {"eps": eps / 2, "robust_accuracy": 0.6},
                      {"eps": eps, "robust_accuracy": robust_acc}, {"eps": 2 * eps, "robust_accuracy": 0.0}],
        "steps_curve": {"attack": attacks[0]["name"] if attacks else "pgd", "eps": eps,
                        "points": [{"steps": s, "robust_accuracy": r}
                                   for s, r in ((5, 0.7), (10, 0.6), (50, 0.52), (200, robust_acc))]},
        "rejected": 1, "seconds": 3.0 * len(attacks),
    }
    if checks is None:
        checks = [{"name": "large-eps", "status": "pass", "detail": "accuracy 0.00% at eps=1"},
                  {"name": "more-steps", "status": "warn", "detail": "accuracy fell 2.0 points from 50 to 200 steps"},
                  {"name": "finite-gradients", "status": "pass", "detail": "all gradients finite and non-zero"}]
    store.finish_run(run_id, summary, checks)
    return run_id


@pytest.fixture
def store(tmp_path: Path):
    with ResultsStore(tmp_path / "runs.db") as s:
        yield s


FAILING_CHECKS = [
    {"name": "large-eps", "status": "fail", "detail": "accuracy 35.00% at eps=1 <suspicious>"},
    {"name": "more-steps", "status": "warn", "detail": "fell by 2 points"},
    {"name": "black-box-vs-white-box", "status": "pass", "detail": "white-box stronger"},
]
EVIL = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One store with a few runs, each report written once (plots are the slow part)."""
    root = tmp_path_factory.mktemp("reports")
    with ResultsStore(root / "runs.db") as s:
        runs = {
            "main": make_run(s, n=10, n_clean=8, broken=(2, 1), checks=FAILING_CHECKS,
                             model_info={"eval_mode_forced": ["features.bn1", "features.drop"]}),
            "csv": make_run(s, model="csv-net", n=12, n_clean=9, broken=(3, 2)),
            "evil": make_run(s, model=EVIL, attacks=[{"name": "<b>pgd</b>", "params": {"note": "<i>"}, "targeted": False}],
                             broken=(3,), classes=[f"<c{i}>" for i in range(10)], channels=3,
                             model_info={"randomized": True}),
            "partial": make_run(s, model="partial-net", n=10, n_clean=8, broken=(2, 1), complete=False, batches=2),
            "failed": make_run(s, model="failed-net", complete=False),
        }
        s.set_status(runs["failed"], "failed")
        paths = {name: write_report(s, run, root / name, gallery_size=0 if name in ("csv", "failed") else 12)
                 for name, run in runs.items()}
        stored = {name: s.get_run(run) for name, run in runs.items()}
    return {"runs": runs, "paths": paths, "stored": stored, "db": root / "runs.db"}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _page(reports, name: str) -> str:
    return reports["paths"][name]["html"].read_text(encoding="utf-8")


def test_report_is_self_contained_and_has_the_numbers(reports):
    paths = reports["paths"]["main"]
    assert set(paths) == {"html", "summary", "samples"}
    assert all(p.exists() for p in paths.values())
    page = _page(reports, "main")

    # Self-contained: nothing is fetched from anywhere, plots are embedded, no scripts.
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    images = _pngs(page)
    assert len(images) == 3  # eps curve, steps curve, gallery
    assert all(img.startswith(PNG_MAGIC) for img in images)

    # The numbers: clean 8/10, robust after apgd-ce 6/10, after apgd-t 5/10; samples broken; costs.
    assert "80.00%" in page and "60.00%" in page and "50.00%" in page
    assert "apgd-ce" in page and "apgd-t" in page
    assert "1,000" in page and "2,400" in page  # gradients of attack 0, forwards of attack 1
    assert "0.3" in page and "L∞" in page

    # Sanity verdicts with their colors and escaped details; a failure is called out at the top.
    for cls in ("badge pass", "badge warn", "badge fail"):
        assert cls in page
    assert "accuracy 35.00% at eps=1 &lt;suspicious&gt;" in page
    assert "1 sanity check(s) failed" in page
    assert page.index("sanity check(s) failed") < page.index("<h2>Results</h2>")

    # Model notes: eval mode was forced, and which submodules.
    assert "Evaluated in eval mode" in page and "features.bn1, features.drop" in page
    assert "Doe et al. 2024" in page  # model card field
    assert "Randomized model" not in page
    assert "INCOMPLETE" not in page
    assert "claimed success(es) rejected" in page


def test_summary_json_and_samples_csv(reports):
    paths = reports["paths"]["csv"]
    doc = json.loads(paths["summary"].read_text())
    stored = reports["stored"]["csv"]
    assert doc["summary"] == stored["summary"]
    assert doc["checks"] == stored["checks"]
    assert doc["config"] == stored["config"]
    assert doc["environment"] == ENV
    assert doc["partial"] is False and doc["status"] == "complete"
    assert doc["summary"]["robust_accuracy"] == pytest.approx(4 / 12)

    with paths["samples"].open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    assert header[:10] == ["sample_index", "label", "clean_pred", "clean_correct", "robust", "broken_by", "adv_pred",
                           "distance", "gradients", "forwards"]
    assert len(body) == 12
    col = {name: i for i, name in enumerate(header)}
    assert sum(int(r[col["robust"]]) for r in body) == 4
    assert sum(int(r[col["clean_correct"]]) for r in body) == 9
    assert [r[col["broken_by_attack"]] for r in body].count("apgd-t") == 2
    assert body[11][col["broken_by"]] == ""  # misclassified clean: never attacked
    # Without a gallery the two curves are still embedded.
    assert len(_pngs(_page(reports, "csv"))) == 2
    assert "Evaluated in eval mode" not in _page(reports, "csv")


def test_randomized_model_is_warned_about(reports):
    page = _page(reports, "evil")
    assert "Randomized model" in page and "EOT" in page
    assert "Evaluated in eval mode" not in page


def test_incomplete_run_gets_a_partial_report(reports):
    paths = reports["paths"]["partial"]
    page = _page(reports, "partial")
    assert "INCOMPLETE RUN" in page and 'class="banner incomplete"' in page
    assert "5 of 10 samples" in page
    # First batch: samples 0..4, all clean-correct; attack 0 broke 0 and 1, attack 1 broke 2 -> 2 of 5 robust.
    assert "100.00%" in page and "40.00%" in page
    assert "Sanity checks: not run yet" in page
    assert len(_pngs(page)) == 1  # the gallery of what was found so far; no curves yet
    doc = json.loads(paths["summary"].read_text())
    assert doc["partial"] is True and doc["status"] == "running"
    assert doc["summary"]["robust_accuracy"] == pytest.approx(0.4)
    assert [a["broken"] for a in doc["summary"]["attacks"]] == [2, 1]
    with paths["samples"].open() as fh:
        assert len(list(csv.reader(fh))) == 1 + 5


def test_failed_run_banner(reports):
    page = _page(reports, "failed")
    assert 'class="banner failed"' in page and "status: failed" in page


def test_html_escaping_of_model_name(reports, tmp_path):
    page = _page(reports, "evil")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>pgd</b>" not in page and "&lt;b&gt;pgd&lt;/b&gt;" in page

    with ResultsStore(reports["db"]) as s:
        site = write_site(s, tmp_path / "site", reports=False)
    for page in [site.index, *(tmp_path / "site" / "models").glob("*.html")]:
        text = page.read_text()  # the site's own script is the only one
        assert text.lower().count("<script") == 1 and 'alert("x")' not in text
    assert "&lt;script&gt;" in site.index.read_text()


def test_report_accepts_prefix_and_latest(store, tmp_path):
    make_run(store, model="first", complete=False)
    run = make_run(store, model="second", complete=False)
    page = write_report(store, "latest", tmp_path / "l", gallery_size=0)["html"].read_text()
    assert "Robustness report: second" in page
    page = write_report(store, run[:6], tmp_path / "p", gallery_size=0)["html"].read_text()
    assert run in page


def test_empty_leaderboard(store, tmp_path):
    assert leaderboard(store) == []
    assert "No complete runs" in format_leaderboard([])
    assert "No complete runs" in write_site(store, tmp_path / "e").index.read_text()


def test_plots_return_png(store):
    run = make_run(store, channels=3, broken=(2, 2))
    summary = store.get_run(run)["summary"]
    for png in (plot_eps_curve(summary), plot_steps_curve(summary),
                plot_gallery(store.examples(run, "main"), classes=[f"class {i}" for i in range(10)])):
        assert png.startswith(PNG_MAGIC) and len(png) > 2000
    # Nothing to draw still gives an image, not an exception.
    empty = {"threat": {"norm": "l2", "eps": 0.5}, "eps_curve": [], "steps_curve": None}
    for png in (plot_eps_curve(empty), plot_steps_curve(empty), plot_gallery([])):
        assert png.startswith(PNG_MAGIC)


def test_wilson_interval():
    # Closed forms: 0 of n gives [0, z^2 / (n + z^2)]; 1/2 of 100 gives 0.5 -/+ 0.0962.
    low, high = wilson_interval(0.0, 10)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (10 + 1.96**2))
    assert wilson_interval(1.0, 10) == pytest.approx((1 - 1.96**2 / (10 + 1.96**2), 1.0))
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    # More samples, a narrower interval around the same proportion.
    narrow = wilson_interval(0.9, 10000)
    assert narrow[0] < 0.9 < narrow[1] and narrow[1] - narrow[0] < 0.013
    assert wilson_interval(None, 10) is None and wilson_interval(0.5, 0) is None
    assert ci_text(0.5, 100) == "95% CI 40.4% – 59.6% (n = 100)" and ci_text(None, 5) == ""
