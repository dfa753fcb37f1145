"""The settler (worker/settle.py): its gathering of forward batches, pure, on a queue; its ack, on a real Redis
and on a port nobody listens at."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from rerankq.redis_server import free_port
from rerankq.worker.settle import ack_all, gather


def inbox(*groups: Sequence[Any] | None) -> queue.SimpleQueue[Any]:
    box: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for group in groups:
        box.put(group)
    return box


def test_batches_waiting_are_settled_together_in_order() -> None:
    box = inbox(["a", "b"], ["c"], ["d", "e"])
    assert gather(box) == ["a", "b", "c", "d", "e"]
    assert box.empty()


def test_a_gathering_stops_at_its_limit_and_leaves_the_rest() -> None:
    box = inbox(["a", "b"], ["c", "d"], ["e"])
    assert gather(box, limit=3) == ["a", "b", "c", "d"]  # whole batches: the one that crosses the limit is taken
    assert gather(box, limit=3) == ["e"]


def test_a_stop_behind_batches_settles_them_first() -> None:
    box = inbox(["a"], ["b"], None)
    assert gather(box) == ["a", "b"]
    assert gather(box) is None


class _Broker:
    """What ``ack_all`` uses of the worker's broker: a real client, and kombu's unacked keys."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    def unacked_keys(self) -> tuple[str, str]:
        return f"unacked_index-{id(self)}", f"unacked-{id(self)}"


def _delivery(tag: str, at: float | None) -> Any:
    return SimpleNamespace(delivery_tag=tag, delivered_at=at)


def test_an_ack_that_reaches_redis_removes_its_record(redis_url: str) -> None:
    broker = _Broker(redis_url)
    index, records = broker.unacked_keys()
    broker.client.zadd(index, {"t": 100.0})
    broker.client.hset(records, "t", "job")
    message = _delivery("t", 100.0)
    assert ack_all(broker, [message]) is True  # type: ignore[arg-type]
    assert message.acked_in_redis and broker.client.hget(records, "t") is None


def test_an_ack_that_cannot_reach_redis_is_tried_again_for_its_patience_then_left_to_the_event_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    """A Redis nobody listens at: each try fails at once. Tried again within ``patience_s``; with none left (an
    earlier ack spent it), or for a delivery acked by tag alone, tried once."""
    broker = _Broker(f"redis://127.0.0.1:{free_port()}/0")

    def tries_again(patience_s: float, at: float | None) -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rerankq.worker.settle"):
            started = time.monotonic()
            assert ack_all(broker, [_delivery("t", at)], patience_s=patience_s) is False  # type: ignore[arg-type]
            assert time.monotonic() - started < patience_s + 0.5
        return sum("trying again on a new connection" in r.getMessage() for r in caplog.records)

    assert tries_again(0.6, 100.0) >= 2
    assert tries_again(0.0, 100.0) == 0
    assert tries_again(5.0, None) == 0
