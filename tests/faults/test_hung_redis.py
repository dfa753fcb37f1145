"""A Redis that hangs (SIGSTOP) or goes silent for good on a worker's open connections (its host lost, a
failover to the same address) while the worker scores: every connection times out, the worker carries on
over new connections, and every job gets exactly one outcome. Real Redis, real worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import RedisServer
from rerankq.tasks.connections import rerankq_key
from rerankq.worker.stats import WorkerStats
from rerankq.worker.upstream.patches import bound_heartbeat_retries
from tests.conftest import eventually, new_queue
from tests.faults.jobs import scored_once, send, where
from tests.faults.proxy import BlackHoleProxy

pytestmark = pytest.mark.integration

#: One forward batch of the test's jobs takes this long: long enough to hang Redis in the middle of it.
BATCH_MS = 1500
#: How long the heartbeat test keeps Redis hung: a bounded publish (two tries of a 1 s timeout) is long done.
HUNG_S = 20
TIMEOUTS = {"RERANKQ_SOCKET_TIMEOUT_S": "1", "RERANKQ_HEALTH_CHECK_S": "1", "RERANKQ_POLL_MS": "100"}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def served(client: redis.Redis, queue: str, node: str) -> int:
    raw = client.hget(rerankq_key("", "workers", queue), node)
    return WorkerStats.decode(raw).served if raw else 0  # type: ignore[arg-type]


def start_worker(url: str, queue: str, tmp_path: Path) -> WorkerProcess:
    env = {"RERANKQ_BROKER_URL": url, "RERANKQ_RESULT_BACKEND": url, "RERANKQ_GPU_QUEUE": queue, **TIMEOUTS}
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", f"latency_ms={BATCH_MS},token_us=0"], env,
                           tmp_path / "worker.log", f"hung.{queue}@localhost")
    eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
    return worker


def answered_once(client: redis.Redis, queue: str, ids: list[str], node: str, timeout: float) -> None:
    """Every job of ``ids`` answered, none left anywhere, and the worker scored each once."""
    eventually(lambda: where(client, queue, ids, node)["answered"] == len(ids), timeout, "every job answered")
    eventually(lambda: where(client, queue, ids, node)["unacked"] == 0, 10, "every job acked")
    seen = where(client, queue, ids, node)
    assert seen["waiting"] == seen["in flight"] == 0, seen


def left(client: redis.Redis, queue: str, ids: list[str], node: str) -> int:
    seen = where(client, queue, ids, node)
    return seen["waiting"] + seen["unacked"] + seen["in flight"]


def test_a_redis_gone_silent_on_a_workers_connections_mid_batch_costs_a_timeout_not_a_job(
        server: RedisServer, tmp_path: Path) -> None:
    queue, client = new_queue(), redis.Redis.from_url(server.url)
    proxy = BlackHoleProxy(server.port)
    worker = start_worker(f"redis://127.0.0.1:{proxy.port}/0", queue, tmp_path)
    try:
        ids = send({"RERANKQ_BROKER_URL": server.url}, queue, 6)
        eventually(lambda: where(client, queue, ids, worker.node)["unacked"] == 6, 30, "the worker took every job")
        time.sleep(0.3)  # in their forward batch
        proxy.swallow()  # nothing the worker sends on any connection it has reaches Redis any more, or answers
        # Without timeouts the worker waited for good on its dead connections: no job was ever answered.
        answered_once(client, queue, ids, worker.node, 60)
        more = send({"RERANKQ_BROKER_URL": server.url}, queue, 6)
        answered_once(client, queue, more, worker.node, 60)  # served again, over new connections
        every = ids + more
        scored_once(lambda: served(client, queue, worker.node), every, lambda: left(client, queue, every, worker.node),
                    3, "each job scored exactly once")
        assert worker.proc.poll() is None
    finally:
        worker.stop()


def test_acks_whose_connection_goes_silent_are_sent_again_on_a_new_one_and_no_job_is_scored_twice(
        server: RedisServer, tmp_path: Path) -> None:
    """The broker's connections go silent while the worker settles a steady flow of jobs (its results go to
    Redis directly): an ack on a connection in use (no idle health check to find it dead) times out. The settler
    sends it again on a new connection. Before, it left it to the job's own ack on the event loop, as dead, and
    the job stayed unacked for the watchdog to put back, scored twice (a failover's connections, too, fail
    while in use, RELIABILITY.md)."""
    queue, client = new_queue(), redis.Redis.from_url(server.url)
    proxy = BlackHoleProxy(server.port)
    env = {"RERANKQ_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0", "RERANKQ_RESULT_BACKEND": server.url,
           "RERANKQ_GPU_QUEUE": queue, **TIMEOUTS}
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=100,token_us=0"], env,
                           tmp_path / "worker.log", f"acks.{queue}@localhost")
    watchdog = RerankqProcess(["watchdog"], {"RERANKQ_BROKER_URL": server.url, "RERANKQ_GPU_QUEUE": queue,
                                             **TIMEOUTS}, tmp_path / "watchdog.log")
    try:
        eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
        ids = send({"RERANKQ_BROKER_URL": server.url}, queue, 400)
        eventually(lambda: where(client, queue, ids, worker.node)["answered"] >= 40, 60, "the worker serves")
        print(f"\nat the swallow: {where(client, queue, ids, worker.node)}")
        proxy.swallow()  # every connection the worker has to the broker, in use or not, goes silent
        answered_once(client, queue, ids, worker.node, 90)
        scored_once(lambda: served(client, queue, worker.node), ids, lambda: left(client, queue, ids, worker.node),
                    3, "each job scored exactly once")
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        watchdog.stop()


def test_a_redis_hung_mid_batch_for_longer_than_the_timeouts_costs_no_job_and_no_second_scoring(
        server: RedisServer, tmp_path: Path) -> None:
    queue, client = new_queue(), redis.Redis.from_url(server.url)
    worker = start_worker(server.url, queue, tmp_path)
    watchdog = RerankqProcess(["watchdog"], {"RERANKQ_BROKER_URL": server.url, "RERANKQ_GPU_QUEUE": queue,
                                             **TIMEOUTS}, tmp_path / "watchdog.log")
    try:
        ids = send({"RERANKQ_BROKER_URL": server.url}, queue, 6)
        eventually(lambda: where(client, queue, ids, worker.node)["unacked"] == 6, 30, "the worker took every job")
        time.sleep(0.3)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(4)  # past every timeout: the worker's writes and receives give up and reconnect
        os.kill(server.pid, signal.SIGCONT)
        answered_once(client, queue, ids, worker.node, 60)
        more = send({"RERANKQ_BROKER_URL": server.url}, queue, 6)
        answered_once(client, queue, more, worker.node, 60)
        every = ids + more
        scored_once(lambda: served(client, queue, worker.node), every, lambda: left(client, queue, every, worker.node),
                    3, "each job scored exactly once")
        assert worker.proc.poll() is None and watchdog.proc.poll() is None
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        worker.stop()
        watchdog.stop()


def test_a_heartbeat_sent_while_redis_hangs_gives_up_after_its_bounded_retries(server: RedisServer,
                                                                                 celery_app: Any) -> None:
    """Celery's heartbeat, as a worker sends it (``Heart._send``, ``retry=True`` and no policy), on a Redis that
    hangs: kombu alone retried for as long as Redis hung, the worker's event loop inside that one publish."""
    from celery.worker.heartbeat import Heart
    from kombu.asynchronous.timer import Timer
    from kombu.connection import Connection

    timeouts = {"socket_timeout": 1, "socket_connect_timeout": 1}
    with Connection(server.url, transport_options=timeouts) as connection:
        dispatcher = celery_app.events.Dispatcher(connection, hostname="heart@test", enabled=True)
        bound_heartbeat_retries(dispatcher)
        heart = Heart(Timer(), dispatcher, interval=2)
        heart._send("worker-heartbeat")  # Redis answers
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            beat = threading.Thread(target=heart._send, args=("worker-heartbeat",), daemon=True)
            beat.start()
            beat.join(HUNG_S)
            assert not beat.is_alive(), f"a heartbeat still retrying {HUNG_S} s into a hang"
            print(f"\nthe heartbeat gave up after {time.monotonic() - started:.1f} s")
        finally:
            os.kill(server.pid, signal.SIGCONT)
        heart._send("worker-heartbeat")  # and goes again once Redis does
