"""A worker's broker connection killed (``CLIENT KILL``) while Redis stays up, mid-chunk: what a network blip
does. Real Redis, real worker and watchdog processes."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from rerankq.local import WorkerProcess
from rerankq.tasks import Result, rerank
from rerankq.tasks.connections import BrokerRedis
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue
from tests.faults.test_worker_faults import JOB, served, simulated, waiting

pytestmark = pytest.mark.integration

#: What Celery logs when a worker's connection to the broker breaks.
LOST = "Connection to broker lost"


@pytest.fixture
def broker(celery_app: Any) -> Any:
    broker = BrokerRedis(celery_app)
    yield broker
    broker.close()


def kill_receiving_connection(broker: BrokerRedis, worker: WorkerProcess, timeout: float = 10) -> None:
    """``CLIENT KILL`` the connection ``worker`` receives jobs on (its only one that runs ``BLMOVE``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = local_ports(worker.proc.pid)
        for client in broker.client.client_list():
            if client.get("cmd") == "blmove" and int(client["addr"].rsplit(":", 1)[1]) in ports:
                broker.client.client_kill_filter(_id=client["id"])
                return
        time.sleep(0.005)
    raise AssertionError(f"no connection of {worker.node} ran BLMOVE within {timeout}s")


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def unacked(broker: BrokerRedis, handles: list[Any]) -> int:
    """How many of these jobs have a record in kombu's unacked hash (other tests' jobs may, too)."""
    ids = {handle.id for handle in handles}
    records = [json.loads(raw)[0] for raw in broker.client.hvals(broker.unacked_keys()[1])]
    return sum(1 for message in records if message["headers"]["id"] in ids)


def test_a_reconnect_mid_chunk_serves_each_job_once_and_leaves_nothing_behind(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue = new_queue()
    worker = start_worker(*simulated(3000), queue=queue, RERANKQ_POLL_MS="100")
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(6)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker took every job")
    time.sleep(0.5)  # its six jobs are in their 3 s forward batch
    kill_receiving_connection(broker, worker)
    assert all(Result.from_dict(h.get(timeout=60)).scores for h in handles)
    time.sleep(4)  # a job served twice would be done by now (kombu put all six back, and they were: 12)
    assert served(broker, queue, worker.node) == 6
    assert waiting(broker, queue) == 0
    eventually(lambda: unacked(broker, handles) == 0, 5, "every job acked")
    assert LOST in worker.log() and "the connection closed while 6 job(s) were being served" in worker.log()
    assert rerank.apply_async(JOB, queue=queue).get(timeout=30)  # and it serves over its new connection


def test_a_warm_shutdown_after_a_reconnect_puts_the_jobs_not_started_back_at_once(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue = new_queue()
    # A window of at most 2 jobs, room for 12: the worker runs 1 or 2 at a time, holds all 6 and keeps
    # receiving (a receive outstanding when the connection dies is what makes Celery reconnect; kombu 5.7
    # quietly reopens an idle receiving connection that died).
    stopping = start_worker(*simulated(2000), queue=queue, RERANKQ_MAX_CHUNK_JOBS="2", RERANKQ_PREFETCH="12")
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(6)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker holds every job")
    kill_receiving_connection(broker, stopping)
    eventually(lambda: LOST in stopping.log(), 10, "the worker lost its connection")
    time.sleep(0.5)  # reconnected: the jobs it holds came on a channel now closed, which no open one knows
    assert stopping.stop() == 0
    finished = sum(h.ready() for h in handles)
    assert finished < 6
    assert waiting(broker, queue) == 6 - finished  # back at once, not after a reclaim or the visibility timeout
    assert unacked(broker, handles) == 0
    start_worker(*simulated(1), queue=queue)
    assert all(Result.from_dict(h.get(timeout=60)).ranker == "simulated" for h in handles)


def test_a_reconnect_then_the_worker_killed_mid_chunk_every_job_served_exactly_once(
        start_worker: StartWorker, start_watchdog: StartWatchdog, broker: BrokerRedis) -> None:
    queue = new_queue()
    env = {"RERANKQ_GPU_QUEUE": queue, "RERANKQ_POLL_MS": "100"}  # the watchdog reclaims its queues' jobs
    doomed = start_worker(*simulated(8000), queue=queue, **env)
    start_watchdog(**env)
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(6)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker took every job")
    time.sleep(0.5)
    kill_receiving_connection(broker, doomed)
    eventually(lambda: "the connection closed while 6 job(s) were being served" in doomed.log(), 10, "a reconnect")
    time.sleep(0.5)  # the jobs still in their forward batch, recorded from before the reconnect
    doomed.kill()
    rescuer = start_worker(*simulated(1), queue=queue, **env)
    assert {Result.from_dict(h.get(timeout=60)).ranker for h in handles} == {"simulated"}
    time.sleep(2)
    assert served(broker, queue, rescuer.node) == 6
    eventually(lambda: unacked(broker, handles) == 0 and waiting(broker, queue) == 0, 5, "nothing left behind")
