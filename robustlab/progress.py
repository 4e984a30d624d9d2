"""Progress of long work: a live bar on a terminal, a plain line every so often in a log file.

``progress(...)`` is used by training (batches of an epoch) and evaluation (batches of a run). With
``enabled=None`` it picks by where standard error goes: a terminal gets a tqdm bar; a file or a pipe
(``nohup``, a batch job, CI) gets one line at most every ``INTERVAL`` seconds with the count, the
percentage, the elapsed time, an estimate of the time left and the latest figures, so a long job
in a log is never silent until it ends. ``enabled=False`` shows nothing; ``True`` forces the bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, TextIO

INTERVAL = 60.0  # seconds between two lines of progress in a log


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """The subset of tqdm's interface robustlab uses, writing plain lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float | None = None, stream: TextIO | None = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.n, self.postfix = desc, unit, 0, ""
        self.interval = INTERVAL if interval is None else interval
        self.stream = stream
        self.start = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval and (self.total is None or self.n < self.total):
            self.last = now
            (self.stream or sys.stderr).write(self.line(now) + "\n")
            (self.stream or sys.stderr).flush()

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if self.total:
            left = f"about {_clock(elapsed * (self.total - self.n) / self.n)} left" if self.n else "time left unknown yet"
            text = (f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), "
                    f"{_clock(elapsed)} elapsed, {left}")
        else:
            text = f"{self.desc}: {self.n} {self.unit}, {_clock(elapsed)} elapsed"
        return f"{text}; {self.postfix}" if self.postfix else text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool | None = None, leave: bool = True):
    """A progress display for ``iterable`` (or ``total`` steps counted with ``update``): see the module
    docstring for ``enabled``."""
    from tqdm.auto import tqdm

    if enabled is None and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=enabled is False, leave=leave)
