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
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TextIO

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
        self.time_left: Callable[[], str] | None = None  # the caller's estimate (e.g. TimeLeft.text)

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
            if self.time_left is not None:
                left = self.time_left()
            else:
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


class TimeLeft:
    """The time left of work made of items whose cost differs by kind (an evaluation's tasks: the
    main ensemble, each epsilon of the curve, each strength, the sanity checks), estimated from the
    work left: each remaining item costs its size times the seconds per unit measured on items of the
    same key, else of the same group (another epsilon of the curve). Work with neither measured has no
    estimate: the text then says "at least" (the measured part) and which keys are not counted,
    instead of extrapolating one kind's cost to all (which said "17:54 left" for a run whose later
    items took seconds).
    """

    def __init__(self) -> None:
        self.left: dict[Hashable, list[float]] = {}  # key -> sizes of the items still to do
        self.group: dict[Hashable, Hashable] = {}  # key -> its group
        self.rate: dict[Hashable, tuple[float, float]] = {}  # key or ("group", g) -> (seconds, units) measured
        self.current: tuple[Hashable, float, float] | None = None  # (key, size, started) of the item running

    def plan(self, key: Hashable, size: float, group: Hashable = None) -> None:
        """An item still to do."""
        self.left.setdefault(key, []).append(float(size))
        self.group[key] = group

    def measured(self, key: Hashable, size: float, seconds: float, group: Hashable = None) -> None:
        """The cost of an item done (now, or before a resume)."""
        group = self.group.get(key, group)
        for k in (key, ("group", group)) if group is not None else (key,):
            s, u = self.rate.get(k, (0.0, 0.0))
            self.rate[k] = (s + seconds, u + size)

    def start(self, key: Hashable, size: float) -> None:
        """An item begins (it is no longer left; its time so far counts while it runs)."""
        sizes = self.left.get(key, [])
        if float(size) in sizes:
            sizes.remove(float(size))
        self.current = (key, float(size), time.perf_counter())

    def done(self, key: Hashable, size: float, seconds: float | None = None) -> None:
        """The item that ran is finished (``seconds``: its cost, default the time since ``start``)."""
        if seconds is None:
            seconds = time.perf_counter() - self.current[2] if self.current else 0.0
        self.measured(key, size, seconds)
        self.current = None

    def _per_unit(self, key: Hashable) -> float | None:
        for k in (key, ("group", self.group.get(key))):
            s, u = self.rate.get(k, (0.0, 0.0))
            if u > 0:
                return s / u
        return None

    def seconds(self) -> tuple[float, list[Hashable]]:
        """(seconds left over the work with a measured cost, the keys with work left and none)."""
        total, unknown = 0.0, []
        for key, sizes in self.left.items():
            if sizes:
                rate = self._per_unit(key)
                if rate is None:
                    unknown.append(key)
                else:
                    total += sum(sizes) * rate
        if self.current is not None:
            key, size, started = self.current
            rate = self._per_unit(key)
            if rate is not None:
                total += max(0.0, size * rate - (time.perf_counter() - started))
            elif key not in unknown:
                unknown.insert(0, key)
        return total, unknown

    def text(self) -> str:
        """"about 1:20 left", "at least 1:20 left (eps=0.05, steps=10 not measured yet)", or "time left
        unknown yet (...)" when nothing left has been measured."""
        total, unknown = self.seconds()
        if not unknown:
            return f"about {_clock(total)} left"
        names = ", ".join(map(str, unknown[:4])) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        if total <= 0:
            return f"time left unknown yet ({names} not measured yet)"
        return f"at least {_clock(total)} left ({names} not measured yet)"


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool | None = None, leave: bool = True):
    """A progress display for ``iterable`` (or ``total`` steps counted with ``update``): see the module
    docstring for ``enabled``."""
    from tqdm.auto import tqdm

    if enabled is None and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=enabled is False, leave=leave)
