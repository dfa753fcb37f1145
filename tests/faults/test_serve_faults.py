"""``rerankq serve`` when the Redis it talks to goes silent for good on the connections it holds, as when a
host dies or a failover moves the address: a real server behind a real TCP proxy that black-holes every
connection open at the time, while new ones reach Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rerankq.local import ServerProcess, WorkerProcess
from rerankq.redis_server import RedisServer, free_port
from tests.conftest import eventually, new_queue
from tests.faults.proxy import BlackHoleProxy

pytestmark = pytest.mark.integration

BODY = {"query": "bread", "documents": ["flour and water", "a river bank"]}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_redis_gone_silent_costs_requests_a_timeout_and_the_server_recovers_on_new_connections(
        redis: RedisServer, tmp_path: Path) -> None:
    queue = new_queue()
    direct = {"RERANKQ_BROKER_URL": redis.url, "RERANKQ_RESULT_BACKEND": redis.url}
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0"], direct,
                           tmp_path / "worker.log", f"silent.{queue}@localhost")
    proxy = BlackHoleProxy(redis.port)
    proxied = f"redis://127.0.0.1:{proxy.port}/0"
    server = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": proxied, "RERANKQ_RESULT_BACKEND": proxied,
                                         "RERANKQ_GPU_QUEUE": queue, "RERANKQ_SOCKET_TIMEOUT_S": "1",
                                         "RERANKQ_SERVE_TIMEOUT_S": "3"}, tmp_path / "serve.log")
    try:
        eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
        server.wait_ready()
        url = f"{server.url}/v1/rerank"
        # Open connections of every kind: sends, the result waiter, the health probe and the route reads.
        warm = asyncio.run(_post(url, 12))
        assert [r.status_code for r in warm] == [200] * 12, server.log()[-3000:]
        assert httpx.get(f"{server.url}/health").status_code == 200

        proxy.swallow()
        began = time.monotonic()
        during = asyncio.run(_post(url, 12))
        # Each answered within its timeout (a 504, or a 503 if its send gave up), or served on a new connection.
        assert time.monotonic() - began < 15
        assert {r.status_code for r in during} <= {200, 503, 504}

        def serving_again() -> bool:
            answers = asyncio.run(_post(url, 6))
            return [r.status_code for r in answers] == [200] * 6
        eventually(serving_again, 60, "requests served again, on new connections")
        eventually(lambda: httpx.get(f"{server.url}/health", timeout=10).status_code == 200, 30, "healthy again")
    finally:
        server.stop()
        worker.stop()


async def _post(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(client.post(url, json=BODY) for _ in range(n))))
