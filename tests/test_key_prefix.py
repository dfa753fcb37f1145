"""Two rerankq deployments on one Redis, one of them under ``RERANKQ_KEY_PREFIX``, with the same queue names:
neither serves, answers, counts or controls the other's jobs and workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from rerankq.celeryconfig import Settings, backend_options, broker_options, celery_config
from rerankq.local import WorkerProcess
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.errors import ConfigError
from rerankq.tasks.rerank import TASK_NAME
from tests.conftest import StartWorker, eventually, new_queue

pytestmark = pytest.mark.integration

PREFIX = "tenant-b:"


@pytest.fixture(scope="module")
def tenant_b(redis_url: str) -> Iterator[Celery]:
    """Deployment B's producers: the project's Celery settings under the prefix."""
    settings = Settings.from_env({"RERANKQ_BROKER_URL": redis_url, "RERANKQ_KEY_PREFIX": PREFIX})
    app = Celery("tenant-b", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.update(broker_url=redis_url, result_backend=redis_url, broker_transport_options=broker_options(settings),
                    result_backend_transport_options=backend_options(settings))
    yield app
    app.close()


def send(app: Any, queue: str, n: int) -> list[Any]:
    return [app.send_task(TASK_NAME, (f"query {i}", ["a doc", "another doc"]), queue=queue) for i in range(n)]


def keys_of(broker: BrokerRedis, task_id: str) -> list[str]:
    return [key.decode() for key in broker.client.keys(f"*{task_id}*")]  # type: ignore[union-attr]


def reported(broker: BrokerRedis, queue: str, node: str) -> None:
    """``node`` and no other worker reports in its deployment's figures for ``queue``."""
    workers = broker.key("workers", queue)
    eventually(lambda: bool(broker.client.hexists(workers, node)), 5, f"{node} reports in {workers}")
    assert broker.client.hkeys(workers) == [node.encode()]


def test_two_deployments_on_one_redis_with_the_same_queues_never_meet(
        start_worker: StartWorker, celery_app: Any, tenant_b: Celery, redis_url: str, tmp_path: Path) -> None:
    queue = new_queue()
    model_a, model_b = "latency_ms=1,token_us=0", "latency_ms=2,token_us=0"
    worker_a = start_worker("--ranker", "simulated", "--model", model_a, queue=queue)
    worker_b = WorkerProcess(queue, ["--ranker", "simulated", "--model", model_b],
                             {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                              "RERANKQ_KEY_PREFIX": PREFIX},
                             tmp_path / "worker-b.log", f"{uuid.uuid4().hex[:8]}.b@localhost")
    try:
        worker_b.wait_ready(tenant_b)
        # Control is per deployment too: A's app cannot reach B's worker, nor B's app A's.
        assert celery_app.control.ping(destination=[worker_b.node], timeout=0.5) == []
        assert tenant_b.control.ping(destination=[worker_a.node], timeout=0.5) == []

        jobs_a, jobs_b = send(celery_app, queue, 20), send(tenant_b, queue, 20)
        assert {job.get(timeout=30)["model"] for job in jobs_a} == {model_a}
        assert {job.get(timeout=30)["model"] for job in jobs_b} == {model_b}

        broker_a, broker_b = BrokerRedis(celery_app), BrokerRedis(tenant_b)
        try:
            for broker, node in ((broker_a, worker_a.node), (broker_b, worker_b.node)):
                reported(broker, queue, node)
            # Every key of B's jobs lives under B's prefix (results included); none of A's does.
            keys_b = [key for job in jobs_b for key in keys_of(broker_a, job.id)]
            keys_a = [key for job in jobs_a for key in keys_of(broker_a, job.id)]
            assert len(keys_b) >= len(jobs_b) and all(key.startswith(PREFIX) for key in keys_b)
            assert len(keys_a) >= len(jobs_a) and not any(key.startswith(PREFIX) for key in keys_a)
        finally:
            broker_a.close()
            broker_b.close()
    finally:
        worker_b.stop()


def test_a_key_prefix_must_end_in_a_colon() -> None:
    with pytest.raises(ConfigError, match="RERANKQ_KEY_PREFIX='tenant' must end in ':'"):
        Settings.from_env({"RERANKQ_KEY_PREFIX": "tenant"})
