"""``rerankq serve`` over real HTTP: real server processes, a real worker, a real Redis, real clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from rerankq.local import ServerProcess
from rerankq.redis_server import free_port
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.records import SPLIT, TRUNCATE_LEFT
from rerankq.tasks.router import SHED, RouteState, state_key
from rerankq.worker import windows
from rerankq.worker.torch_rankers import CrossEncoderRanker
from tests.conftest import StartWorker, new_queue

pytestmark = pytest.mark.integration

QUERY = "how do I feed a sourdough starter"
DOCS = ["feed the starter flour and water daily", "the river bank flooded", "a starter is wild yeast",
        "interest rates on a bank loan"]
KEY = "test-key-1234"
StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def start_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """``start_server(**env)``: a real ``rerankq serve`` on a free port, answering HTTP; all stop at the end."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                             **env}, tmp_path_factory.mktemp("serve") / "serve.log")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def served(start_worker: StartWorker, start_server: StartServer, xlmr_model: Path) -> ServerProcess:
    """A server in front of a real worker, with an API key; the model answers to Cohere's name for it too (what
    a deployment sets for clients that send one)."""
    queue = new_queue()
    models = json.dumps([{"name": "bge-reranker-v2-m3", "model": str(xlmr_model), "queue": queue,
                          "aliases": ["rerank-v3.5"]}])
    start_worker("--model", "bge-reranker-v2-m3", queue=queue, RERANKQ_MODELS=models)
    return start_server(RERANKQ_MODELS=models, RERANKQ_SERVE_API_KEY=KEY)


@pytest.fixture(scope="module")
def http(served: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers={"authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def idle(start_server: StartServer, celery_app: Any) -> Iterator[tuple[ServerProcess, str]]:
    """A server whose queue no worker serves, with small limits and a short timeout."""
    queue = new_queue()
    server = start_server(RERANKQ_GPU_QUEUE=queue, RERANKQ_SERVE_TIMEOUT_S="0.5", RERANKQ_MAX_DOC_CHARS="100",
                          RERANKQ_SERVE_MAX_BODY_BYTES="20000", RERANKQ_MAX_DOCS="8")
    yield server, queue
    broker = BrokerRedis(celery_app)
    broker.client.delete(*broker.queue_lists(queue))
    broker.close()


@pytest.fixture(scope="module")
def model(xlmr_model: Path) -> CrossEncoder:
    reference: CrossEncoder = CrossEncoder(str(xlmr_model), device="cpu")
    return reference


@pytest.fixture(scope="module")
def scores(model: CrossEncoder) -> list[float]:
    return [float(s) for s in model.predict([(QUERY, d) for d in DOCS])]


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_cohere_shape_gives_results_best_first_with_the_models_scores(http: httpx.Client, path: str,
                                                                      scores: list[float]) -> None:
    response = http.post(path, json={"query": QUERY, "documents": DOCS, "model": "bge-reranker-v2-m3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["results"]] == best_first(scores)
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], sorted(scores, reverse=True),
                               atol=1e-5)
    assert "document" not in body["results"][0]
    assert body["meta"]["ranker"] == "cross-encoder" and body["meta"]["passthrough"] is False
    assert response.headers["x-rerankq-ranker"] == "cross-encoder"
    assert body["meta"]["model"] == response.headers["x-rerankq-model"] == "bge-reranker-v2-m3"
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(response.headers[header]) >= 0


def test_top_n_and_return_documents_with_document_objects(http: httpx.Client, scores: list[float]) -> None:
    response = http.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS],
                                             "top_n": 2, "return_documents": True})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == best_first(scores)[:2]
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in best_first(scores)[:2]]


def test_tei_shape_on_teis_route(http: httpx.Client, scores: list[float], model: CrossEncoder) -> None:
    response = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [r["index"] for r in ranks] == best_first(scores)
    np.testing.assert_allclose([r["score"] for r in ranks], sorted(scores, reverse=True), atol=1e-5)
    assert [r["text"] for r in ranks] == [DOCS[i] for i in best_first(scores)]
    raw = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "truncate": True,
                                     "truncation_direction": "Right"}).json()
    logits = model.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    np.testing.assert_allclose([r["score"] for r in raw], sorted(logits, reverse=True), atol=1e-5)
    assert "text" not in raw[0]
    assert not np.allclose(logits, scores, atol=1e-3)  # raw really is the logit, not the sigmoid


def test_teis_truncation_options_reach_the_worker(http: httpx.Client, model: CrossEncoder, xlmr_model: Path) -> None:
    long_text = " ".join(f"word{i}" for i in range(1500))
    refused = http.post("/rerank", json={"query": QUERY, "texts": [DOCS[0], long_text], "truncate": False})
    assert refused.status_code == 422 and "docs[1] is" in refused.json()["error"]
    assert http.post("/rerank", json={"query": QUERY, "texts": DOCS, "truncate": False}).status_code == 200
    left = http.post("/rerank", json={"query": QUERY, "texts": [long_text], "truncate": True,
                                      "truncation_direction": "Left"})
    ranker = CrossEncoderRanker(str(xlmr_model), "cpu")
    [tail] = windows.pieces(long_text, ranker.offsets(long_text), ranker.window_budget(QUERY), TRUNCATE_LEFT, 0, 1)
    assert left.json()[0]["score"] == pytest.approx(float(model.predict([(QUERY, tail)])[0]), abs=1e-5)
    bad = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "truncation_direction": "up"})
    assert bad.status_code == 422 and "truncation_direction: Input should be" in bad.json()["error"]


def test_cohere_requests_split_long_documents_when_asked(http: httpx.Client, model: CrossEncoder,
                                                         xlmr_model: Path) -> None:
    long_text = " ".join(f"word{i}" for i in range(1500))
    ranker = CrossEncoderRanker(str(xlmr_model), "cpu")
    pieces = windows.pieces(long_text, ranker.offsets(long_text), ranker.window_budget(QUERY), SPLIT, 64, 8)
    want = max(float(s) for s in model.predict([(QUERY, p) for p in pieces]))
    for extra in ({"long_docs": "split"}, {"max_chunks_per_doc": 10}):
        response = http.post("/v1/rerank", json={"query": QUERY, "documents": [long_text], **extra})
        assert response.json()["results"][0]["relevance_score"] == pytest.approx(want, abs=1e-5)


def test_the_cohere_sdk_works_unchanged_against_rerankq_serve(served: ServerProcess, scores: list[float]) -> None:
    client = cohere.Client(api_key=KEY, base_url=served.url)
    answer = client.rerank(query=QUERY, documents=DOCS, top_n=3, return_documents=True, model="rerank-v3.5")
    assert [r.index for r in answer.results] == best_first(scores)[:3]
    np.testing.assert_allclose([r.relevance_score for r in answer.results], sorted(scores, reverse=True)[:3],
                               atol=1e-5)
    assert answer.results[0].document is not None and answer.results[0].document.text == DOCS[best_first(scores)[0]]
    v2 = cohere.ClientV2(api_key=KEY, base_url=served.url).rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)
    assert [r.index for r in v2.results] == best_first(scores)
    with pytest.raises(cohere.core.ApiError) as refused:
        cohere.Client(api_key="wrong", base_url=served.url).rerank(query=QUERY, documents=DOCS)
    assert refused.value.status_code == 401


def test_llamaindexs_tei_reranker_works_unchanged_against_rerankq_serve(served: ServerProcess,
                                                                       scores: list[float]) -> None:
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.0) for i, d in enumerate(DOCS)]
    reranker = TextEmbeddingInference(base_url=served.url, auth_token=f"Bearer {KEY}", top_n=2)
    kept = reranker.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in kept] == [str(i) for i in best_first(scores)[:2]]
    np.testing.assert_allclose([float(n.score or 0) for n in kept], sorted(scores, reverse=True)[:2], atol=1e-5)


def test_an_api_key_guards_reranking_but_not_health_or_metrics(served: ServerProcess) -> None:
    response = httpx.post(f"{served.url}/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 401 and "RERANKQ_SERVE_API_KEY" in response.json()["message"]
    # Before the body is judged: a stranger learns nothing from it.
    assert httpx.post(f"{served.url}/rerank", content=b"{not json").status_code == 401
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert httpx.get(f"{served.url}/metrics").status_code == 200
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    listed = httpx.get(f"{served.url}/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()
    assert [(m["id"], m["aliases"]) for m in listed["data"]] == [("bge-reranker-v2-m3", ["rerank-v3.5"])]


def test_health_says_ok_with_a_live_worker(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and "1 live worker" in response.json()["reason"]


def test_metrics_count_requests_by_route_and_status_and_answers_by_ranker(http: httpx.Client) -> None:
    http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    text = http.get("/metrics").text
    assert 'rerankq_http_requests_total{route="/v1/rerank",status="200"}' in text
    assert 'rerankq_http_answers_total{ranker="cross-encoder"}' in text
    assert "rerankq_http_request_seconds_bucket" in text


def test_concurrent_requests_all_get_their_own_scores(served: ServerProcess, model: CrossEncoder) -> None:
    """50 requests at once, each with its own query and document order, each compared with its own reference:
    a server that mixed answers up between requests fails here."""
    requests = []
    for i in range(50):
        docs = DOCS[i % len(DOCS):] + DOCS[:i % len(DOCS)] + [f"document number {i}"]
        requests.append({"query": f"{QUERY} {i}", "documents": docs})

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, headers={"authorization": f"Bearer {KEY}"},
                                     timeout=60) as client:
            return list(await asyncio.gather(*(client.post("/v1/rerank", json=body) for body in requests)))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 50
    for body, response in zip(requests, responses, strict=True):
        got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        want = model.predict([(body["query"], d) for d in body["documents"]])
        np.testing.assert_allclose([got[i] for i in range(len(body["documents"]))], want, atol=1e-5)


@pytest.mark.parametrize(("body", "reason"), [
    ({"documents": DOCS}, "query: Field required"),
    ({"query": QUERY, "documents": "one long document"}, "documents"),
    ({"query": QUERY, "documents": ["fine", 7]}, "documents.1"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n: Input should be greater than or equal to 1"),
    ({"query": QUERY, "documents": DOCS, "top_n": "2"}, "top_n: Input should be a valid integer"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "Input should be a valid boolean"),
    ({"query": QUERY, "texts": ["a", None]}, "texts.1: Input should be a valid string"),
    ({"query": "   ", "documents": DOCS}, "query is empty"),
    ({"query": QUERY, "documents": ["d"] * 9}, "9 documents is over the limit of 8 per request (RERANKQ_MAX_DOCS)"),
    ({"query": QUERY, "texts": ["d" * 101]}, "document 0 is 101 characters, over the limit of 100"),
])
def test_a_bad_body_gets_422_with_the_reason_and_never_reaches_redis(idle: tuple[ServerProcess, str],
                                                                    celery_app: Any, body: dict[str, Any],
                                                                    reason: str) -> None:
    server, queue = idle
    response = httpx.post(f"{server.url}/v1/rerank" if "documents" in body else f"{server.url}/rerank", json=body)
    assert response.status_code == 422, response.text
    assert reason in response.json()["error"] and response.json()["message"] == response.json()["error"]
    broker = BrokerRedis(celery_app)
    assert sum(broker.client.llen(name) for name in broker.queue_lists(queue)) == 0
    broker.close()


def test_every_error_has_the_one_shape(idle: tuple[ServerProcess, str]) -> None:
    missing = httpx.get(f"{idle[0].url}/no/such/route")
    assert missing.status_code == 404 and missing.json() == {"message": "Not Found", "error": "Not Found",
                                                             "error_type": "http"}
    assert httpx.get(f"{idle[0].url}/v1/rerank").json()["error"] == "Method Not Allowed"


def test_a_body_that_is_not_json_gets_422(idle: tuple[ServerProcess, str]) -> None:
    response = httpx.post(f"{idle[0].url}/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON decode error" in response.json()["error"]


def test_a_body_over_the_limit_gets_413_by_length_or_as_it_streams(idle: tuple[ServerProcess, str]) -> None:
    big = b'{"query": "q", "documents": ["' + b"x" * 30_000 + b'"]}'
    response = httpx.post(f"{idle[0].url}/v1/rerank", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "RERANKQ_SERVE_MAX_BODY_BYTES" in response.json()["error"]
    assert 'status="413"' in httpx.get(f"{idle[0].url}/metrics").text  # counted like any answer

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    streamed = httpx.post(f"{idle[0].url}/v1/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_no_result_in_time_gets_504_and_health_says_no_worker(idle: tuple[ServerProcess, str]) -> None:
    server, queue = idle
    response = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 504 and "within 0.5s" in response.json()["error"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and f"no live worker serves {queue}" in health.json()["reason"]


def test_an_unreachable_redis_gets_503_saying_what_to_check(start_server: StartServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = start_server(RERANKQ_BROKER_URL=dead, RERANKQ_RESULT_BACKEND=dead, RERANKQ_SERVE_TIMEOUT_S="20")
    began = time.monotonic()
    response = httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": ["d"]}, timeout=60)
    assert response.status_code == 503, response.text
    assert "is Redis up, and RERANKQ_BROKER_URL" in response.json()["error"]
    assert time.monotonic() - began < 20
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 503 and "is Redis up" in health.json()["reason"]


def _shed(celery_app: Any, gpu: str, cpu_open: bool) -> None:
    """The state a watchdog writes when the GPU queue is over its marks."""
    broker = BrokerRedis(celery_app)
    now = time.time()
    broker.client.set(state_key(broker, gpu), RouteState(SHED, cpu_open=cpu_open, since=now, at=now).encode(),
                      px=120_000)
    broker.close()


def test_past_both_marks_the_answer_is_the_retrieval_order_flagged_in_meta(start_server: StartServer,
                                                                          celery_app: Any) -> None:
    gpu = new_queue()
    _shed(celery_app, gpu, cpu_open=False)
    server = start_server(RERANKQ_GPU_QUEUE=gpu, RERANKQ_CPU_QUEUE=new_queue())
    response = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"]["passthrough"] is True and body["meta"]["ranker"] == "passthrough"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    # Answering, but with no worker left behind the answers: not healthy (an overload with workers is degraded).
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and "answering in retrieval order" in health.json()["reason"]


def test_the_reject_mode_answers_429_with_retry_after_instead_of_degrading(start_server: StartServer,
                                                                          celery_app: Any) -> None:
    gpu = new_queue()
    _shed(celery_app, gpu, cpu_open=True)
    server = start_server(RERANKQ_GPU_QUEUE=gpu, RERANKQ_CPU_QUEUE=new_queue(), RERANKQ_SERVE_OVERLOAD="reject")
    response = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1 and "over its marks" in response.json()["error"]
    tei = httpx.post(f"{server.url}/rerank", json={"query": QUERY, "texts": DOCS})
    assert tei.status_code == 429 and tei.json()["error_type"] == "overloaded"
