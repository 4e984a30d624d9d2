"""The time left in logs comes from the work left (issue 19 item 10): per task, the samples left
times the seconds per sample measured on that task (or on another task of its kind); work of a kind
never measured is said to be unknown instead of priced at the first task's cost."""

from __future__ import annotations

import io
import re

from robustlab.progress import LineProgress, TimeLeft


def _standard_like() -> TimeLeft:
    """An ensemble run: main (2 batches of 128, expensive: every attack on all robust points), an
    epsilon curve of 3 points and a steps curve of 2 (cheap), a sanity check (cheap)."""
    eta = TimeLeft()
    for _ in range(2):
        eta.plan("main", 128, "main")
    for eps in ("eps=0.01", "eps=0.02", "eps=0.05"):
        for _ in range(2):
            eta.plan(eps, 128, "eps")
    for steps in ("steps=1", "steps=5"):
        for _ in range(2):
            eta.plan(steps, 128, "steps")
    eta.plan("sanity:large-eps", 100, "sanity")
    return eta


def test_later_cheap_tasks_are_not_priced_like_the_first():
    eta = _standard_like()
    for _ in range(2):  # the main task: 600 s per batch
        eta.start("main", 128)
        eta.done("main", 128, 600.0)
    # The old rule (elapsed x batches left / batches done) said 1200 s x 11 / 2 = 1:50:00.
    assert eta.text().startswith("time left unknown yet (eps=0.01, eps=0.02, eps=0.05, steps=1 and 2 more")
    eta.start("eps=0.01", 128)
    eta.done("eps=0.01", 128, 2.0)
    # eps: the measured rate for its own batch left and the other epsilons (5 batches x 2 s);
    # steps and sanity still unknown.
    total, unknown = eta.seconds()
    assert abs(total - 10.0) < 1e-9 and unknown == ["steps=1", "steps=5", "sanity:large-eps"]
    assert eta.text() == "at least 0:10 left (steps=1, steps=5, sanity:large-eps not measured yet)"
    eta.start("steps=1", 128)
    eta.done("steps=1", 128, 1.0)
    eta.start("sanity:large-eps", 100)
    eta.done("sanity:large-eps", 100, 3.0)
    assert eta.text() == "about 0:13 left"  # 5 x 2 s (eps) + 3 x 1 s (steps)


def test_a_resumed_run_prices_its_work_from_the_batches_done_before():
    eta = TimeLeft()
    eta.plan("main", 64, "main")
    eta.measured("main", 128, 256.0)  # done before the resume: 2 s per sample
    assert eta.text() == "about 2:08 left"


def test_the_log_line_uses_the_estimate():
    out = io.StringIO()
    eta = _standard_like()
    bar = LineProgress(total=13, desc="evaluating", unit="batch", interval=0.0, stream=out)
    bar.time_left = eta.text
    eta.start("main", 128)
    eta.done("main", 128, 600.0)
    bar.update(1)
    line = out.getvalue().strip()
    assert re.match(r"evaluating: 1/13 batch \(8%\), \d+:\d\d elapsed, at least 10:00 left \(eps=0.01", line), line
