"""A result backend that refuses every write, with a real Redis at its memory limit (``maxmemory`` with
``noeviction``), while the broker works: the jobs go back to their queue, nothing piles up in the
worker, and they are served once the backend takes writes again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from rerankq.redis_server import RedisServer
from rerankq.tasks import rerank
from tests.conftest import StartWorker, eventually

pytestmark = pytest.mark.integration

JOBS = 10


@pytest.fixture
def backend() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_jobs_whose_results_cannot_be_written_go_back_and_the_workers_state_stays_flat(
        celery_app: Any, start_worker: StartWorker, backend: RedisServer) -> None:
    worker = start_worker("--ranker", "simulated", "--model", "latency_ms=1,token_us=0",
                          RERANKQ_RESULT_BACKEND=backend.url)
    client = redis.Redis.from_url(backend.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # every write refused: OOM
    handles = [rerank.apply_async(("bread", ["bread and flour"]), queue=worker.queue) for _ in range(JOBS)]

    def requeued() -> int:
        return worker.log().count("could not write the results")

    def held() -> list[dict[str, Any]]:
        """What Celery's worker state holds, by ``inspect``: the worker must answer (no reply passes nothing)."""
        inspect = celery_app.control.inspect(destination=[worker.node], timeout=5)
        active, reserved = inspect.active(), inspect.reserved()
        assert active and reserved is not None and worker.node in active and worker.node in reserved, "no reply"
        return list(active[worker.node]) + list(reserved[worker.node])

    eventually(lambda: requeued() >= 10, 60, "the jobs went back and came round again and again")
    ids, first, rounds = {handle.id for handle in handles}, held(), requeued()
    eventually(lambda: requeued() >= rounds + 20, 60, "twenty more rounds")
    later = held()
    # Every job put back was marked ready: what Celery's worker state holds is what the worker holds now (one
    # entry a job at most), not one entry per time round, however many rounds went by.
    for entries in (first, later):
        assert {task["id"] for task in entries} <= ids and len(entries) <= JOBS, entries

    client.config_set("maxmemory", 0)

    def written() -> list[Any]:
        return [client.get(f"celery-task-meta-{handle.id}") for handle in handles]

    eventually(lambda: all(written()), 30, "every result written")
    for raw in written():
        meta = json.loads(raw)
        assert meta["status"] == "SUCCESS" and meta["result"]["scores"] == [1.0]
    eventually(lambda: not (celery_app.control.inspect(destination=[worker.node], timeout=5).active() or {})
               .get(worker.node), 10, "nothing left active")
