"""The busy ratio and queue-wait p95 a worker reports: pure bookkeeping over a sliding window."""

from __future__ import annotations

import pytest

from rerankq.worker.stats import Busy, Recent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_busy_ratio_is_forward_batch_seconds_over_the_window_or_the_time_since_start() -> None:
    clock = Clock()
    recent = Recent(window_s=10.0, clock=clock)
    clock.now += 2.0
    recent.busy(0.5)
    recent.busy(0.5)
    assert recent.busy_ratio() == 0.5  # 1 s busy in the 2 s since start
    clock.now += 8.0
    assert recent.busy_ratio() == 0.1  # 1 s in a full 10 s window
    clock.now += 5.0
    assert recent.busy_ratio() == 0.0  # those batches have left the window


def test_the_wait_p95_is_over_the_window_and_none_without_waits() -> None:
    clock = Clock()
    recent = Recent(window_s=10.0, clock=clock)
    assert recent.wait_p95_ms() is None
    for ms in range(1, 101):
        recent.waited(ms / 1000)
    assert recent.wait_p95_ms() == 96.0
    clock.now += 11.0
    assert recent.wait_p95_ms() is None


def test_the_busy_ratio_is_the_share_of_the_last_seconds_spent_in_forward_batches() -> None:
    busy = Busy(window_s=2.0)
    assert busy.ratio(0.0) == 0
    for t in range(10):
        busy.add(t * 0.5, 0.25)
    assert busy.ratio(4.5) == pytest.approx(5 * 0.25 / 2.0)  # the batches that ended at 2.5 ... 4.5 s
    assert busy.ratio(100.0) == 0
