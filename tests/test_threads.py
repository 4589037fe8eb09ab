"""Thread count that follows the machine's load (`cmpq.threads`)."""

from __future__ import annotations

import torch

from cmpq import threads
from cmpq.threads import LoadWatcher


def test_a_core_counts_as_taken_once_half_busy(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    watcher = LoadWatcher(2)
    assert watcher.threads_for(0.0) == 2
    assert watcher.threads_for(0.4) == 2
    assert watcher.threads_for(0.6) == 1
    assert watcher.threads_for(5.0) == 1  # never below one
    assert LoadWatcher(1).threads_for(0.0) == 1  # never above the limit


def test_adapt_follows_other_processes_and_not_its_own_work(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    clock, busy, own = [0.0], [100.0], [10.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads, "machine_busy_seconds", lambda: busy[0])
    monkeypatch.setattr(threads, "own_seconds", lambda: own[0])
    before = torch.get_num_threads()
    try:
        watcher = LoadWatcher(2)
        clock[0], busy[0], own[0] = 1.0, 102.0, 12.0  # this process kept both cores busy: nobody else
        assert watcher.adapt() == 2
        clock[0], busy[0], own[0] = 2.0, 104.0, 13.0  # someone else took a core
        assert watcher.adapt() == 1
        clock[0], busy[0] = 2.1, 104.2  # too soon to tell: unchanged
        assert watcher.adapt() == 1
        clock[0], busy[0], own[0] = 3.0, 105.0, 14.0  # the core is free again
        assert watcher.adapt() == 2
    finally:
        torch.set_num_threads(before)


def test_configure_pins_or_adapts():
    before = torch.get_num_threads()
    try:
        threads.configure(1)
        assert torch.get_num_threads() == 1 and threads.adapt() == 1
        threads.configure(None)
        assert 1 <= threads.adapt() <= threads.available_cores()
    finally:
        threads.configure(before)


def test_machine_busy_seconds_grows_with_work():
    first = threads.machine_busy_seconds()
    if first is None:  # not Linux: the watcher keeps the limit
        return
    sum(i * i for i in range(2_000_000))
    assert threads.machine_busy_seconds() > first  # about 0.1 s of this process at least
