"""Hostile or broken items put straight on a worker's queue (``LPUSH``, as anyone with Redis access can):
each is dropped (acked, logged once with its queue and why, counted in ``rerankq_messages_dropped_total``),
never requeued and never fatal; the same worker process then serves the next good job."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from rerankq.local import WorkerProcess
from rerankq.redis_server import free_port
from rerankq.tasks import rerank
from tests.conftest import StartWorker, eventually
from tests.faults.jobs import where
from tests.test_metrics import scrape

pytestmark = pytest.mark.integration

Envelope = dict[str, Any]


def _body(value: object) -> Callable[[Envelope], None]:
    def change(envelope: Envelope) -> None:
        envelope["body"] = base64.b64encode(json.dumps(value).encode()).decode()
    return change


def _header(name: str, value: object) -> Callable[[Envelope], None]:
    def change(envelope: Envelope) -> None:
        envelope["headers"][name] = value
    return change


ARGS = ["bread", ["bread and flour", "stone"]]

#: What reached a worker's queue, and made each worker that read it exit (2c4db98), or spin.
SHAPES: dict[str, Callable[[Envelope], None]] = {
    "body a JSON string": _body("hello"),
    "body null": _body(None),
    "body a dict": _body({"query": "bread"}),
    "body [args] alone": _body([ARGS]),
    "body a 4-item list": _body([ARGS, {}, {}, 1]),
    "header id a dict": _header("id", {"x": 1}),
    "header id null": _header("id", None),
    "body not base64": lambda e: e.update(body="!!not*base64"),
    "delivery tag a list": lambda e: e["properties"].update(delivery_tag=[1, 2]),
    "not JSON at all": lambda e: e.clear(),
    # Found in review: the drop itself raised on these (a list is no dict key), and Celery on the second.
    "a list as routing key, id null": lambda e: _header("id", None)(e) or e["properties"]["delivery_info"].update(
        routing_key=[1]),
    "header task a list": _header("task", ["rerankq.rerank"]),
}


def _raw(client: redis.Redis, queue: str, change: Callable[[Envelope], None]) -> bytes:
    """A real job's message as kombu put it on the queue, taken off again and changed by ``change``."""
    handle = rerank.apply_async(tuple(ARGS), queue=f"{queue}.held")  # a queue no worker reads
    raw = client.rpop(f"{queue}.held")
    assert isinstance(raw, bytes), "the job's message"
    envelope = json.loads(raw)
    assert envelope["headers"]["id"] == handle.id
    envelope["properties"]["delivery_info"]["routing_key"] = queue  # as if sent to the worker's queue
    change(envelope)
    return json.dumps(envelope).encode() if envelope else b"\x00{not json"


def test_each_malformed_message_is_dropped_and_the_same_worker_serves_the_next_job(
        start_worker: StartWorker, redis_url: str) -> None:
    port = free_port()
    worker = start_worker("--ranker", "simulated", "--model", "latency_ms=1,token_us=0", "--metrics-port", str(port))
    client = redis.Redis.from_url(redis_url)
    pid = worker.proc.pid
    for shape, change in SHAPES.items():
        client.lpush(worker.queue, _raw(client, worker.queue, change))
        good = rerank.apply_async(tuple(ARGS), queue=worker.queue)
        eventually(lambda: _alive(worker, pid, shape) and bool(good.ready()), 30,  # noqa: B023 (called at once)
                   f"the job after a message with {shape} answered")
        assert len(good.get(timeout=1)["scores"]) == 2, shape
        # Dropped: not waiting, not unacked, not in flight (nothing left to come back).
        assert client.llen(worker.queue) == 0, shape
        assert where(client, worker.queue, [good.id], worker.node)["answered"] == 1
        assert not _ours(client, worker.queue), shape
        for lane in ("", ".bulk"):
            assert client.llen(f"rerankq:inflight:{worker.node}:{worker.queue}{lane}") == 0, shape

    counted = {name: value for name, value in scrape(port).items() if name.startswith("rerankq_messages_dropped_total")}
    assert sum(counted.values()) == len(SHAPES), counted
    assert sum(v for name, v in counted.items() if 'queue="other"' in name) == 1  # its routing key is no queue
    log = worker.log()
    assert log.count("dropped an item of queue ") == len(SHAPES), log[-5000:]
    assert "Unrecoverable error" not in log and "Traceback" not in log, log[-5000:]
    # No busy requeue loop: each was dropped once, and nothing else is received.
    eventually(lambda: client.llen(worker.queue) == 0, 1, "the queue stays empty")


def _alive(worker: WorkerProcess, pid: int, shape: str) -> bool:
    assert worker.proc.poll() is None and worker.proc.pid == pid, f"{shape}:\n{worker.log()[-3000:]}"
    return True


def _ours(client: redis.Redis, queue: str) -> bool:
    """An unacked record of a message routed to ``queue``."""
    return any(queue.encode() in record for record in client.hvals("unacked"))
