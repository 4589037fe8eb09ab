"""Progress lines when output is not a terminal, and the stage profile of a run."""

from __future__ import annotations

import time

import pytest

from cmpq import progress
from cmpq.progress import LineBar, profiling, stage, stage_table


def test_line_bar_prints_a_line_per_tenth_and_no_carriage_returns(capsys):
    for _ in LineBar(range(1000), desc="work", unit="item"):
        pass
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert len(lines) == 10  # 10%, ..., 90% and the final line
    assert lines[0].startswith("work: 100/1000 items (10%)") and "left" in lines[0]
    assert lines[-1].startswith("work: 1000/1000 items (100%), done in")


def test_line_bar_manual_updates_postfix_and_disable(capsys):
    bar = LineBar(total=3, desc="epochs", unit="epoch")
    for _ in range(3):
        bar.update()
        bar.set_postfix_str("loss 1.0")
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all("loss" not in line for line in lines)
    for _ in LineBar(range(50), desc="quiet", disable=True):
        pass
    assert capsys.readouterr().err == ""


def test_bar_is_tqdm_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert isinstance(progress.bar(range(3)), LineBar)
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert not isinstance(progress.bar(range(3), disable=True), LineBar)


def test_nested_stages_charge_their_own_time_and_add_up_to_the_wall_time():
    with profiling() as profile:
        with stage("outer"):
            time.sleep(0.02)
            with stage("inner"):
                time.sleep(0.05)
            time.sleep(0.02)
        with stage("inner"):
            time.sleep(0.01)
        time.sleep(0.01)
    seconds = profile.as_dict()
    assert list(seconds) == ["outer", "inner", "other"]
    assert seconds["inner"] == pytest.approx(0.06, abs=0.03)
    assert seconds["outer"] == pytest.approx(0.04, abs=0.03)
    assert sum(seconds.values()) == pytest.approx(profile.wall, abs=0.005)
    table = stage_table(seconds)
    assert table.splitlines()[0].startswith("time by stage") and "inner" in table


def test_stage_outside_a_profile_does_nothing_and_errors_leave_it_consistent():
    with stage("alone"):
        pass
    with profiling() as profile:
        with pytest.raises(ValueError):
            with stage("failing"):
                raise ValueError("x")
        with stage("after"):
            pass
    assert set(profile.as_dict()) == {"failing", "after", "other"}
    with stage("alone again"):  # no profile open any more
        pass


def test_the_rise_of_peak_rss_is_charged_to_the_stage_that_allocated():
    import os

    import numpy as np

    from cmpq.progress import peak_rss_mb

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc to read the current RSS")
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    size = peak_rss_mb() - current + 64  # MiB: 64 above the process's peak so far, whatever earlier tests used
    with profiling() as profile:
        with stage("small"):
            pass
        with stage("large"):
            block = np.ones(int(size * 2**20 // 8))  # touched page by page
            del block
    rss = profile.rss_dict()
    assert rss.get("large", 0.0) >= 60 and rss.get("small", 0.0) < 10
    lines = stage_table(profile.as_dict(), rss).splitlines()
    assert "rise of peak RSS" in lines[0] and lines[-1].startswith("  peak RSS")
    assert any(line.strip().startswith("large") and "+" in line for line in lines)
