"""How many threads to run with now: the cores this process may use, less those other processes keep busy.

Every parallel region ends at a barrier. When another process holds one of two cores, the thread that shares
it with that process runs in scheduler slices, and each of the thousands of small parallel operations of a
quantization (k-means steps, error feedback, statistics) waits for it: a quick run's quantize stage went from
2.2 to 57 seconds per block with one competing busy process. One thread on the free core only loses the
parallelism, so the run slows down in proportion to the cores it lost.

`adapt()` is called at natural boundaries (each block, each calibration window); it reads the machine's busy
time from /proc/stat and this process's own CPU time, and sets torch's thread count (which the native kernels
follow) to the cores left over, never above the limit. Elsewhere than Linux it keeps the limit.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch

MIN_INTERVAL = 0.5  # seconds between two samples: shorter intervals are dominated by tick granularity
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_busy_seconds() -> float | None:
    """CPU-seconds all cores have been busy since boot (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND


def own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class LoadWatcher:
    """Sets torch's thread count to `limit` less the cores other processes used since the last sample."""

    limit: int
    _time: float = 0.0
    _busy: float | None = None
    _own: float = 0.0

    def __post_init__(self) -> None:
        self.limit = max(1, int(self.limit))
        self._sample()

    def _sample(self) -> None:
        self._time, self._busy, self._own = time.monotonic(), machine_busy_seconds(), own_seconds()

    def other_cores(self) -> float | None:
        """Cores busy with other processes since the last sample (None if unknown or too soon to tell)."""
        now = time.monotonic()
        elapsed = now - self._time
        if elapsed < MIN_INTERVAL:
            return None
        busy, own = machine_busy_seconds(), own_seconds()
        if busy is None or self._busy is None:
            return None
        other = ((busy - self._busy) - (own - self._own)) / elapsed
        self._time, self._busy, self._own = now, busy, own
        return max(other, 0.0)

    def threads_for(self, other: float) -> int:
        """The thread count for `other` busy cores: a core counts as taken once it is half busy."""
        return max(1, min(self.limit, available_cores() - int(other + 0.5)))

    def adapt(self) -> int:
        other = self.other_cores()
        if other is not None:
            threads = self.threads_for(other)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()


_watcher: LoadWatcher | None = None
_pinned: int | None = None


def pinned() -> int | None:
    """The thread count `configure` pinned, or None while the count follows the load (or nothing set it)."""
    return _pinned


def configure(threads: int | None) -> None:
    """`threads` given: exactly that many, always. None: adapt to the load, up to the available cores."""
    global _watcher, _pinned
    _pinned = threads or None
    if threads:
        torch.set_num_threads(threads)
        _watcher = None
    else:
        torch.set_num_threads(available_cores())
        _watcher = LoadWatcher(available_cores())


def adapt() -> int:
    """Follow the machine's load now if `configure(None)` asked for it; returns the thread count in use."""
    return _watcher.adapt() if _watcher is not None else torch.get_num_threads()
