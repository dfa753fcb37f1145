"""The FastAPI example (`examples/rerank_api.py`) over HTTP, against a real worker and Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sentence_transformers import CrossEncoder

from examples.rerank_api import create_app
from rerankq.redis_server import free_port
from tasks import rerank
from tasks.connections import BrokerRedis
from tasks.router import SHED, Router, RouteState, state_key
from tests.conftest import StartWorker, new_queue

pytestmark = pytest.mark.integration

QUERY = "how do I feed a sourdough starter"
DOCS = ["feed the starter flour and water daily", "the river bank flooded", "a starter is wild yeast",
        "interest rates on a bank loan"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def queue(start_worker: StartWorker, tiny_model: Path) -> str:
    return start_worker("--model", str(tiny_model)).queue


@pytest.fixture(scope="module")
def client(queue: str) -> Iterator[TestClient]:
    # As a context manager the client keeps one event loop, as a server process does.
    with TestClient(create_app(timeout_s=30, queue=queue)) as client:
        yield client


@pytest.fixture(scope="module")
def scores(tiny_model: Path) -> list[float]:
    model = CrossEncoder(str(tiny_model), device="cpu")
    return [float(s) for s in model.predict([(QUERY, d) for d in DOCS])]


def test_results_are_sorted_best_first_with_the_models_scores(client: TestClient, scores: list[float]) -> None:
    response = client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    np.testing.assert_allclose([r["relevance_score"] for r in results], sorted(scores, reverse=True), atol=1e-5)
    assert "document" not in results[0]
    assert body["passthrough"] is False and body["meta"]["ranker"] == "cross-encoder"


def test_top_n_and_return_documents(client: TestClient, scores: list[float]) -> None:
    response = client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2,
                                            "return_documents": True, "model": "ignored-by-rerankq"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    best = sorted(range(len(DOCS)), key=lambda i: -scores[i])[:2]
    assert [r["index"] for r in results] == best
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in best]


@pytest.mark.parametrize(("body", "reason"), [
    ({"documents": DOCS}, "Field required"),
    ({"query": QUERY, "documents": "one long document"}, "Input should be a valid list"),
    ({"query": QUERY, "documents": ["fine", 7]}, "Input should be a valid string"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "greater than or equal to 1"),
    ({"query": QUERY, "documents": DOCS, "top_n": "2"}, "Input should be a valid integer"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "Input should be a valid boolean"),
    # Checked by rerankq's own job validation (in the worker), reported the same way.
    ({"query": "   ", "documents": DOCS}, "query is empty"),
    ({"query": QUERY, "documents": ["d"] * 1001}, "1001 docs is over the limit of 1000"),
])
def test_a_bad_body_gets_422_with_the_reason(client: TestClient, body: dict[str, Any], reason: str) -> None:
    response = client.post("/rerank", json=body)
    assert response.status_code == 422
    assert reason in " ".join(error["msg"] for error in response.json()["detail"])


def test_a_body_that_is_not_json_gets_422(client: TestClient) -> None:
    response = client.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in response.text


def test_no_result_in_time_gets_504(celery_app: Any) -> None:
    nobody = new_queue()
    with TestClient(create_app(timeout_s=0.5, queue=nobody)) as client:
        response = client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 504
    assert "within 0.5s" in response.json()["detail"][0]["msg"]
    broker = BrokerRedis(celery_app)
    broker.client.delete(*broker.queue_lists(nobody))
    broker.close()


def test_an_unreachable_redis_gets_503_saying_what_to_check() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    script = ("from fastapi.testclient import TestClient; from examples.rerank_api import app; "
              "r = TestClient(app).post('/rerank', json={'query': 'q', 'documents': ['d']}); "
              "print(r.status_code, r.text)")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RERANKQ_BROKER_URL": dead, "RERANKQ_RESULT_BACKEND": dead})
    assert run.stdout.startswith("503 "), run.stdout + run.stderr
    assert "is Redis up, and RERANKQ_BROKER_URL" in run.stdout


def test_a_passthrough_answer_is_marked(celery_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both queues over their marks (the state a watchdog writes): the request's own order comes back at once."""
    gpu, cpu = new_queue(), new_queue()
    broker = BrokerRedis(celery_app)
    now = time.time()
    broker.client.set(state_key(broker, gpu), RouteState(SHED, cpu_open=False, since=now, at=now).encode(), px=60_000)
    monkeypatch.setattr(rerank, "router", Router(lambda: broker, gpu, cpu, cache_s=0.0, passthrough=True))
    with TestClient(create_app(timeout_s=30)) as client:
        response = client.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3})
    broker.close()
    assert response.status_code == 200
    body = response.json()
    assert body["passthrough"] is True and body["meta"]["ranker"] == "passthrough"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]


def test_uvicorn_serves_concurrent_requests_as_the_readme_runs_it(queue: str, redis_url: str,
                                                                  scores: list[float]) -> None:
    port = free_port()
    env = {**os.environ, "RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
           "RERANKQ_GPU_QUEUE": queue}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.rerank_api:app", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(server, url)
        responses = asyncio.run(_post_concurrently(f"{url}/rerank", 50))
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert [r.status_code for r in responses] == [200] * 50, output
    for response in responses:
        got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], scores, atol=1e-5)
    assert "Application shutdown complete" in output


async def _post_concurrently(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(client.post(url, json={"query": QUERY, "documents": DOCS})
                                           for _ in range(n))))


def _wait_until_up(server: subprocess.Popen[bytes], url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"uvicorn exited: {server.communicate()[0].decode()}")
        try:
            if httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"uvicorn not answering at {url} within {timeout}s")
