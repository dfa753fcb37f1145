"""A full Redis: a real redis-server 7 at its ``maxmemory`` under ``noeviction`` (filled by another key), with
jobs queued before it filled up.

Redis then refuses BLMOVE, MULTI and every write that grows memory. Workers must not die of it (before, a worker
started on a full Redis exited at once with ``OutOfMemoryError`` and its supervisor restarted it into the same
error), must keep serving what is queued, and must never lose a job; producers get ``RedisFull``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rerankq.local import ServerProcess, WorkerProcess
from rerankq.redis_server import RedisServer, free_port
from tests.conftest import eventually, needs_system_redis, new_queue, rerankq
from tests.faults.jobs import send, where

pytestmark = [pytest.mark.integration, needs_system_redis]

JOBS = 50
FILLER_MB = 8
FILLER = "someone-elses-cache"


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer(system=True) as server:
        yield server


@pytest.fixture
def separate_backend() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _fill(client: redis.Redis) -> None:
    """Another key takes FILLER_MB (written by a script: a value sent whole would leave a query buffer that
    Redis frees later); maxmemory is set half of that below what is then used: full."""
    client.eval("for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], i, string.rep('x', 1024)) end",
                1, FILLER, FILLER_MB * 1024)
    used = int(client.info("memory")["used_memory"])  # type: ignore[index]
    client.config_set("maxmemory", used - FILLER_MB * 2**19)
    with pytest.raises(redis.OutOfMemoryError):
        client.set("probe", "x")


def test_a_worker_started_on_a_full_redis_serves_keeps_every_job_and_answers_once_there_is_room(
        broker: RedisServer, tmp_path: Path) -> None:
    queue = new_queue()
    env = {"RERANKQ_BROKER_URL": broker.url, "RERANKQ_GPU_QUEUE": queue}
    client = redis.Redis.from_url(broker.url)
    ids = send(env, queue, JOBS)
    _fill(client)
    port = free_port()
    node = f"full.{queue}@h"
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0",
                                   "--metrics-port", str(port)], env, tmp_path / "worker.log", node)
    server = ServerProcess(free_port(), env, tmp_path / "serve.log")
    try:
        eventually(lambda: "results of" in worker.log() and "Redis is full" in worker.log(), 90,
                   "the worker receives, scores, and finds it cannot write")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # while full: the worker lives, and every job is somewhere
            assert worker.proc.poll() is None, worker.log()[-3000:]
            seen = where(client, queue, ids, node)
            assert seen["lost"] == 0 and seen["answered"] == 0, seen
            time.sleep(0.5)
        assert "rerankq_redis_full 1.0" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

        # A producer is told why, and so is an HTTP client.
        refused = subprocess.run([sys.executable, "-c", "from rerankq import rerank; rerank('q', ['d'])"],
                                 env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert "RedisFull" in refused.stderr and "out of memory" in refused.stderr, refused.stderr[-2000:]
        server.wait_ready()
        answer = httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": ["d"]}, timeout=30)
        assert answer.status_code == 503 and "out of memory" in answer.json()["message"], answer.text
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        status = rerankq("status", env=env)
        assert "FULL" in status.stdout, status.stdout + status.stderr

        client.delete(FILLER)  # memory comes back (DEL is never refused)
        eventually(lambda: where(client, queue, ids, node)["answered"] == JOBS, 60, "every job answered")
        for job in ids:
            meta = json.loads(client.get(f"celery-task-meta-{job}"))  # type: ignore[arg-type]
            assert meta["status"] == "SUCCESS" and len(meta["result"]["scores"]) == 2
        eventually(lambda: client.hlen("unacked") == 0, 10, "nothing left unacked")
        assert worker.proc.poll() is None
    finally:
        server.stop()
        worker.stop()


def test_a_worker_drains_a_full_broker_into_a_backend_with_room(
        broker: RedisServer, separate_backend: RedisServer, tmp_path: Path) -> None:
    queue = new_queue()
    env = {"RERANKQ_BROKER_URL": broker.url, "RERANKQ_RESULT_BACKEND": separate_backend.url,
           "RERANKQ_GPU_QUEUE": queue}
    client, results = redis.Redis.from_url(broker.url), redis.Redis.from_url(separate_backend.url)
    ids = send(env, queue, JOBS)
    _fill(client)
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0"], env,
                           tmp_path / "worker.log", f"drain.{queue}@h")
    try:
        eventually(lambda: all(results.exists(f"celery-task-meta-{job}") for job in ids), 90,
                   "every job answered while the broker stays full")
        assert "Redis is full" in worker.log()
        eventually(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 10, "the queue drained")
        with pytest.raises(redis.OutOfMemoryError):  # still full: the filler is still there
            client.set("probe", "x")
    finally:
        worker.stop()
