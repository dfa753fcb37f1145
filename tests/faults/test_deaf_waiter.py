"""A result subscription gone silent without an error (its Redis host lost, a failover that moved the
address: the socket stays open and nothing comes): the waiters take it for deaf from what their sweeps find
and subscribe again on a new connection, so results come by message again instead of by sweep, seconds
late, for good. A real worker, a real Redis, a real TCP proxy that black-holes the waiters' connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.backends.redis import RedisBackend

from rerankq.local import WorkerProcess
from rerankq.producer.waiting import AsyncWaiter, Waiter
from rerankq.redis_server import RedisServer
from tests.conftest import eventually, new_queue
from tests.faults.jobs import send
from tests.faults.proxy import BlackHoleProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str]]:
    """A Redis of the module's own (the proxy needs its port) and a worker serving a queue on it directly."""
    with RedisServer() as server:
        queue = new_queue()
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url, "RERANKQ_GPU_QUEUE": queue}
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0"], env,
                               tmp_path_factory.mktemp("deaf") / "worker.log", f"deaf.{queue}@localhost")
        try:
            eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
            yield server, queue
        finally:
            worker.stop()


def through_proxy(celery_app: Any, proxy: BlackHoleProxy) -> Any:
    """A result backend whose connections go through ``proxy``, timing out after 1 s on a dead one (the
    sweep's reads then reconnect, as on a client set with a socket timeout)."""
    backend = RedisBackend(app=celery_app, url=f"redis://127.0.0.1:{proxy.port}/0")
    backend.connparams["socket_timeout"] = 1.0
    return backend


def send_expected(server: RedisServer, queue: str, ids: list[str]) -> None:
    send({"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}, queue, len(ids), ids=ids)


def test_a_waiter_whose_subscription_goes_silent_subscribes_again_and_hears_results_again(
        setup: tuple[RedisServer, str], celery_app: Any) -> None:
    server, queue = setup
    proxy = BlackHoleProxy(server.port)
    waiter = Waiter(through_proxy(celery_app, proxy))

    def served(n: int) -> None:
        ids = [str(uuid.uuid4()) for _ in range(n)]
        for task_id in ids:
            waiter.expect(task_id)
        send_expected(server, queue, ids)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            got.update(waiter.arrived(1.0))
        assert set(got) == set(ids)
        assert not any(isinstance(outcome, BaseException) for outcome in got.values())

    try:
        served(3)
        assert waiter.by_message
        proxy.swallow()
        for _ in range(3):  # by sweep, until two sweeps in a row found what no message brought
            served(1)
        assert waiter.by_sweep >= 2
        heard = waiter.by_message
        served(3)
        assert waiter.by_message > heard  # without the check: never again, every result seconds late by sweep
    finally:
        waiter.close()


def test_an_async_waiter_whose_subscription_goes_silent_subscribes_again_and_hears_results_again(
        setup: tuple[RedisServer, str], celery_app: Any) -> None:
    server, queue = setup
    proxy = BlackHoleProxy(server.port)

    async def main() -> None:
        waiter = AsyncWaiter(through_proxy(celery_app, proxy))

        async def served(n: int) -> None:
            ids = [str(uuid.uuid4()) for _ in range(n)]
            futures = [await waiter.expect(task_id) for task_id in ids]
            await asyncio.to_thread(send_expected, server, queue, ids)
            outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
            assert not any(isinstance(outcome, BaseException) for outcome in outcomes)

        try:
            await served(3)
            assert waiter.by_message
            proxy.swallow()
            for _ in range(3):
                await served(1)
            assert waiter.by_sweep >= 2
            heard = waiter.by_message
            await served(3)
            assert waiter.by_message > heard
        finally:
            await waiter.close()

    asyncio.run(main())
