"""How the leaderboard site scales with the results store: 1,000 and 10,000 complete runs.

For each size: fill a store through its API (complete adversarial runs with stored summaries, no
evaluation: models evaluated two to three times each over two threat models, one run in seven with a
weaker attack list), then time ``build_leaderboard`` and ``write_site`` (without run reports: those
are ``robustlab report``'s cost, once per run, and skipped when up to date), and, when chromium and
chromedriver are installed, the index page's load in headless chromium (best of three loads: wall
time until the load event, and the page's own clock at a forced layout after it).

There is no peer to compare against (RobustBench's leaderboard is a hosted page built from its JSON
files); the figures are for sizing. Timing is CPU time of this process for the Python side
(``time.process_time``; the machine may be shared), wall time for the browser.

    python benchmarks/leaderboard_site.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from robustlab.attacks.suites import SUITES
from robustlab.eval.store import ResultsStore
from robustlab.report import build_leaderboard, write_site
from robustlab.threat import ThreatModel

RESULTS = Path(__file__).parent / "results" / "leaderboard_site.txt"
WEAK = [{"name": "apgd-ce", "params": {"steps": 20, "restarts": 1, "eot": 1, "rho": 0.75}}]


def fill(store: ResultsStore, runs: int) -> int:
    """``runs`` complete runs over ``runs * 2 // 5`` models; returns the number of models."""
    models = max(1, runs * 2 // 5)
    for i in range(runs):
        m, eps = i % models, (4 / 255 if (i // models) % 2 else 8 / 255)
        attacks = [a.config() for a in SUITES.get("standard")(ThreatModel("linf", eps))] if i % 7 else WEAK
        config = {"model": f"zoo:model-{m}", "model_sha256": f"{m:064x}", "dataset": "cifar10", "split": "test",
                  "n": 1000, "seed": 0, "norm": "linf", "eps": eps, "attacks": attacks}
        run = store.create_run("adversarial", config, {}, {"card": {"sha256": f"{m:064x}"}},
                               [{**a, "targeted": False} for a in attacks])
        robust, clean = (i * 37) % 600 / 1000, 0.8 + (i % 7) / 100
        store.finish_run(run, {"n": 1000, "threat": {"norm": "linf", "eps": eps}, "clean_accuracy": clean,
                               "robust_accuracy": robust, "eps_curve": [{"eps": 0.0, "robust_accuracy": clean},
                                                                        {"eps": eps, "robust_accuracy": robust}]}, [])
    return models


def browser_load(index: Path) -> tuple[float, float, float] | None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        return None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Performance.enable", {})

    def thread_time() -> float:  # CPU seconds of the page's main thread
        metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "ThreadTime")

    try:
        walls, renders, cpus = [], [], []
        for _ in range(3):
            driver.get("about:blank")
            before = thread_time()
            started = time.perf_counter()
            driver.get(index.as_uri())
            walls.append(time.perf_counter() - started)
            renders.append(driver.execute_script("document.body.getBoundingClientRect(); return performance.now();"))
            cpus.append(thread_time() - before)
        return min(walls), min(renders) / 1000, min(cpus)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    args = parser.parse_args()
    lines = [(f"leaderboard site scaling ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); CPU seconds of "
             "this process for the Python side, wall seconds in headless chromium (best of 3 loads)"), ""]
    header = f"{'runs':>6} {'models':>6} {'fill':>7} {'build':>7} {'site':>7} {'index KB':>9} {'files':>6} " \
             f"{'load s':>7} {'render s':>8} {'page CPU s':>10}"
    lines.append(header)
    print(header)
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            with ResultsStore(Path(tmp) / "runs.db") as store:
                t = time.process_time()
                models = fill(store, size)
                filled = time.process_time() - t
                t = time.process_time()
                board = build_leaderboard(store)
                built = time.process_time() - t
                t = time.process_time()
                result = write_site(store, Path(tmp) / "site", reports=False)
                site = time.process_time() - t
            assert len(board.models) == models
            files = sum(1 for p in (Path(tmp) / "site").rglob("*") if p.is_file())
            load = browser_load(result.index)
            row = (f"{size:>6} {models:>6} {filled:>7.2f} {built:>7.2f} {site:>7.2f} "
                   f"{result.index.stat().st_size / 1024:>9.0f} {files:>6} "
                   + (f"{load[0]:>7.2f} {load[1]:>8.2f} {load[2]:>10.2f}" if load else f"{'-':>7} {'-':>8} {'-':>10}"))
        lines.append(row)
        print(row, flush=True)
    lines += ["", ("fill: writing the runs through the store API; build: build_leaderboard (groups, identities, "
              "ranks); site: write_site without reports (index, model pages, JSON records, leaderboard.json)."),
              ("load / render: wall seconds to the load event / to a forced layout after it; page CPU: CPU seconds of "
               "the page's main thread (Chrome's ThreadTime), which a shared machine does not inflate."),
              f"machine load average when written: {os.getloadavg()[0]:.1f} (2 cores shared with other work)"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"written {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
