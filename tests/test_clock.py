"""The one clock: this host's plus its offset from Redis's TIME."""

from __future__ import annotations

import time

import pytest

from rerankq.tasks import clock


class Redis:
    """A client whose server's clock is ``ahead`` seconds ahead of this host's."""

    def __init__(self, ahead: float) -> None:
        self.ahead, self.calls = ahead, 0

    def time(self) -> tuple[int, int]:
        self.calls += 1
        now = time.time() + self.ahead
        return int(now), int((now % 1) * 1e6)


def test_now_follows_redis_clock_not_this_hosts() -> None:
    clock.sync(lambda: Redis(-7.5), force=True)
    assert abs(clock.offset() + 7.5) < 0.05
    assert abs(clock.now() - (time.time() - 7.5)) < 0.05


def test_the_offset_is_measured_again_only_after_the_sync_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "SYNC_S", 0.3)
    server = Redis(3.0)
    clock.sync(lambda: server, force=True)
    clock.sync(lambda: server)  # within SYNC_S: not asked again
    assert server.calls == 1
    time.sleep(0.35)
    moved = Redis(-1.0)  # the clock moved meanwhile (a failover to a Redis on another host, say)
    clock.sync(lambda: moved)  # past SYNC_S: measured again
    assert moved.calls == 1 and abs(clock.offset() + 1.0) < 0.05
    clock.sync(lambda: Redis(0.0), force=True)  # leave this process's clock as it was


def test_a_failed_measurement_keeps_the_last_offset() -> None:
    clock.sync(lambda: Redis(2.0), force=True)

    def unreachable() -> Redis:
        raise ConnectionError("Redis is down")

    clock.sync(unreachable, force=True)
    assert abs(clock.offset() - 2.0) < 0.05
    clock.sync(lambda: Redis(0.0), force=True)  # leave this process's clock as it was
