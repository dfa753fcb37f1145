"""One clock for every host: Redis's.

Liveness (a worker unheard for a few seconds), the reclaim grace, deadlines and queue waits compare a time
one host wrote with another host's now. Host clocks drift apart by seconds (no NTP in a container, a VM
resumed): a watchdog 2 s ahead of its workers saw none of them live. So every time that crosses hosts is
read from ``now()``: this host's clock plus its offset from Redis's ``TIME``, measured by whoever talks to
Redis anyway (a worker as it starts receiving and at each report, the watchdog's and ``rerankq status``'s
measure, a producer's send) at most every ``SYNC_S``. The offset's error is at most half a round trip (a slow
one is not believed); before the first sync it is 0 (the host's clock).

kombu's own visibility-timeout scan still compares the unacked index (now on Redis's clock) with the
worker's clock: hosts should keep within a small share of ``RERANKQ_VISIBILITY_TIMEOUT`` of Redis's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

#: How often the offset is measured again.
SYNC_S = 10.0
#: A measurement whose round trip took longer is not believed (its error is up to half the round trip: a
#: Redis stalled for seconds would skew the clock by seconds); the next try comes a second later.
MAX_ROUND_TRIP_S = 0.25

_offset = 0.0
_synced_at = float("-inf")
_warned = False
logger = logging.getLogger(__name__)
_lock = threading.Lock()


def now() -> float:
    """Seconds since the epoch on Redis's clock (as far as this process has measured it)."""
    return time.time() + _offset


def sync(client: Callable[[], Any], force: bool = False) -> None:
    """Measure this host's offset from Redis's clock with ``client()`` (a redis-py client, made only when due),
    unless measured in the last ``SYNC_S``. A failure keeps the last offset: the caller's own Redis call says
    what is wrong."""
    global _offset, _synced_at, _warned
    if not force and time.monotonic() - _synced_at < SYNC_S:
        return
    if not _lock.acquire(blocking=False):
        return  # another thread is measuring
    try:
        _synced_at = time.monotonic() - SYNC_S + 1.0  # answered or not, not again within a second
        redis = client()
        before, started = time.time(), time.monotonic()
        seconds, micros = redis.time()
        after, took = time.time(), time.monotonic() - started
        if took <= MAX_ROUND_TRIP_S:
            _offset = seconds + micros / 1e6 - (before + after) / 2
            _synced_at = time.monotonic()
    except Exception as exc:  # the caller's own Redis calls report it; this only says once
        if not _warned:
            logger.warning("could not read Redis's clock (%r): this host's clock stands in until it can", exc)
            _warned = True
    finally:
        _lock.release()


def measure_again() -> None:
    """Have the next ``sync`` measure the offset whatever its age: Redis's clock is another server's now."""
    global _synced_at
    _synced_at = float("-inf")


def offset() -> float:
    """This host's clock subtracted from Redis's, as last measured."""
    return _offset
