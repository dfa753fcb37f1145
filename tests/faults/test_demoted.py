"""Failover by DNS or a virtual IP, as a cloud's primary endpoint does it: the address moves to the replica,
promoted, and the old master is made its replica in place, every connection open to it left there. Its
writes are refused (``READONLY``), its blocked receives released (``UNBLOCKED``): each connection must leave
it for the address's new server (tasks/primary.py). Without that, the worker stopped on its first receive,
and its acks, results and the watchdog's route kept going to the old server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import RedisServer
from tests.conftest import eventually, new_queue
from tests.faults.jobs import Producer, each_answered_once, route, steady_sends, where
from tests.faults.proxy import BlackHoleProxy
from tests.faults.test_hung_redis import served

pytestmark = pytest.mark.integration

#: Writes paused on the old master while the replica catches up and the address moves: no write is lost.
PAUSE_S = 3


def test_a_master_demoted_behind_its_address_loses_no_job_and_restarts_no_process(tmp_path: Path) -> None:
    with RedisServer() as first, RedisServer() as second:
        old, new = redis.Redis(port=first.port, socket_timeout=5), redis.Redis(port=second.port, socket_timeout=5)
        new.replicaof("127.0.0.1", first.port)
        eventually(lambda: new.info("replication")["master_link_status"] == "up", 20, "the replica syncs")
        address = BlackHoleProxy(first.port)
        url = f"redis://127.0.0.1:{address.port}/0"
        queue = new_queue()
        env = {"RERANKQ_BROKER_URL": url, "RERANKQ_RESULT_BACKEND": url, "RERANKQ_GPU_QUEUE": queue,
               "RERANKQ_POLL_MS": "100", "RERANKQ_SOCKET_TIMEOUT_S": "1", "RERANKQ_HEALTH_CHECK_S": "1"}
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=5,token_us=0"], env,
                               tmp_path / "worker.log", f"demoted.{queue}@localhost")
        watchdog = RerankqProcess(["watchdog"], env, tmp_path / "watchdog.log")
        idle = Producer(env, queue)
        try:
            before = idle.served_first(old, worker)

            def fail_over() -> None:
                old.execute_command("CLIENT", "PAUSE", str(PAUSE_S * 1000), "WRITE")
                eventually(lambda: new.info("replication")["slave_repl_offset"]
                           >= old.info("replication")["master_repl_offset"], 10, "the replica has every write")
                new.replicaof("NO", "ONE")
                address.point(second.port)
                old.replicaof("127.0.0.1", second.port)
                old.execute_command("CLIENT", "UNPAUSE")
            sent, refused, _ = steady_sends(env, queue, fail_over,
                                            until=lambda: old.info("replication")["role"] == "slave")
            after = idle.send(20)  # on the connection it opened before the failover
            ids = before + sent + after
            evidence = lambda: (f"on the new master {where(new, queue, ids, worker.node)}\n"  # noqa: E731
                                f"{worker.log()[-6000:]}\n{watchdog.log()[-3000:]}")
            print(f"\ndemoted in place: {len(sent)} jobs accepted while it ran, {len(refused)} sends refused")
            try:
                each_answered_once(new, queue, worker.node, ids, refused, lambda: served(new, queue, worker.node),
                                   30 * float(env["RERANKQ_POLL_MS"]) / 1000, "the demotion's jobs")
                assert idle.answered() == len(before) + len(after)
                # The watchdog writes its route on the new master: it routes new jobs to the worker.
                eventually(lambda: route(env) == f"new jobs go to {queue}", 30, "routed to the worker")
                # Its heartbeats reach the new master, so Flower shows it: their connection only publishes, which
                # a replica never refuses.
                assert heartbeats(new, 6) >= 2
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{evidence()}") from exc
            assert worker.proc.poll() is None and watchdog.proc.poll() is None, evidence()  # never restarted
        finally:
            idle.stop()
            worker.stop()
            watchdog.stop()


def heartbeats(client: redis.Redis, within_s: float) -> int:
    """Celery worker heartbeats published on ``client``'s server within ``within_s``."""
    subscription = client.pubsub()
    subscription.psubscribe("*worker.heartbeat*")
    deadline, count = time.monotonic() + within_s, 0
    while time.monotonic() < deadline:
        message = subscription.get_message(timeout=0.5)
        count += bool(message and message["type"] == "pmessage")
    subscription.close()
    return count
