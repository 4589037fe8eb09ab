"""Progress bars, and where the time of a run goes, stage by stage.

`bar(...)` is tqdm's bar on a terminal. When stderr is not a terminal (a log file, CI, a pipe) it prints one
plain line at each tenth of the work and at the end instead: tqdm's carriage returns would fill a log with
hundreds of kilobytes of redrawn bars.

`with stage("k-means, 3 bits"):` charges the time inside to that stage of the open `profiling()` (and does
nothing when none is open). A stage entered inside another takes its time out of the enclosing one, so the
stages of a profile add up to its wall time; time in no stage is reported as "other".
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether progress goes to a terminal (bars redrawn in place) or to a file (plain lines)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineBar:
    """tqdm's interface (iterate, `update`, `set_postfix_str`, `close`) as plain lines: one at each tenth of
    `total` and one at the end, each with the elapsed time and an estimate of the time left."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, steps: int = 10) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.disable, self.steps = desc, unit, disable, steps
        self.n, self._shown, self._start, self._closed = 0, 0, time.perf_counter(), False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> "LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Ignored: a per-item label on its own line is exactly the noise this class avoids."""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or not self.total:
            return
        step = min(self.steps, self.n * self.steps // self.total)
        if step > self._shown and self.n < self.total:
            self._shown = step
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        if self.total and self.n < self.total:
            left = elapsed / max(self.n, 1) * (self.total - self.n)
            timing = f"{_duration(elapsed)} elapsed, about {_duration(left)} left"
        else:
            timing = f"done in {_duration(elapsed)}"
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        print(f"{self.desc}: {count} {self.unit}s{share}, {timing}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n > 0:
            self._print()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False):
    """A progress bar for one stage: tqdm on a terminal, `LineBar` otherwise."""
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable)
    return LineBar(iterable, total=total, desc=desc, unit=unit, disable=disable)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Profile:
    """Seconds per stage, in the order stages were first entered; `wall`: the profile's whole duration.
    `rss_rise`: MiB by which the process's peak RSS rose while each stage ran (`start_rss`: the peak when the
    profile began), so that the stage that sets the peak can be read off."""

    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    rss_rise: dict[str, float] = field(default_factory=dict)
    start_rss: float = field(default_factory=peak_rss_mb)
    _last_rss: float = 0.0

    def __post_init__(self) -> None:
        self._last_rss = self.start_rss

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.charge_rss(name)

    def charge_rss(self, name: str) -> None:
        """Charge the rise of the peak RSS since the last charge to stage `name`."""
        rss = peak_rss_mb()
        if rss > self._last_rss:
            self.rss_rise[name] = self.rss_rise.get(name, 0.0) + rss - self._last_rss
            self._last_rss = rss

    def rss_dict(self) -> dict[str, float]:
        """The peak's rise per stage (stages that raised it), and "before" (the peak when profiling began)."""
        return {"before": round(self.start_rss, 1), **{name: round(mb, 1) for name, mb in self.rss_rise.items()}}

    def as_dict(self) -> dict[str, float]:
        """Every stage and "other" (time in no stage), rounded to milliseconds, for the record."""
        out = {name: round(s, 3) for name, s in self.seconds.items()}
        out["other"] = round(max(self.wall - sum(self.seconds.values()), 0.0), 3)
        return out


def stage_table(stages: dict[str, float], rss: dict[str, float] | None = None) -> str:
    """A profile's stages (`Profile.as_dict`, as stored in a record) as aligned lines: stage, seconds, share,
    and with `rss` (`Profile.rss_dict`) the MiB by which each stage raised the peak RSS."""
    wall = sum(stages.values())
    width = max((len(name) for name in stages), default=5)
    lines = [f"time by stage ({wall:.1f} s in all)" + (", and the rise of peak RSS in each:" if rss else ":")]
    for name, seconds in stages.items():
        share = 100 * seconds / wall if wall > 0 else 0.0
        rise = f"  +{rss[name]:7.0f} MB" if rss and rss.get(name) else ""
        lines.append(f"  {name:<{width}}  {seconds:8.1f} s  {share:5.1f}%{rise}")
    if rss:
        lines.append(f"  peak RSS {rss.get('before', 0.0) + sum(v for k, v in rss.items() if k != 'before'):.0f} MB "
                     f"({rss.get('before', 0.0):.0f} MB before the first stage)")
    return "\n".join(lines)


_profiles: list[Profile] = []
_open: list[list] = []  # the stages entered and not left yet: [name, time of the last resume]


@contextlib.contextmanager
def profiling() -> Iterator[Profile]:
    """Collect the stages entered inside into a new `Profile` (profiles do not nest: the inner one gets them)."""
    profile, start = Profile(), time.perf_counter()
    _profiles.append(profile)
    depth = len(_open)
    try:
        yield profile
    finally:
        del _open[depth:]
        _profiles.remove(profile)
        profile.wall = time.perf_counter() - start
        profile.charge_rss("other")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Charge the time inside to stage `name` of the open profile (its own time only: nested stages take theirs)."""
    if not _profiles:
        yield
        return
    profile, now = _profiles[-1], time.perf_counter()
    if _open:
        parent = _open[-1]
        profile.add(parent[0], now - parent[1])
    else:
        profile.charge_rss("other")  # between stages
    entry = [name, now]
    _open.append(entry)
    try:
        yield
    finally:
        end = time.perf_counter()
        if _open and _open[-1] is entry:
            _open.pop()
            profile.add(name, end - entry[1])
            if _open:
                _open[-1][1] = end
