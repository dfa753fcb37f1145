"""Two models in one deployment, end to end: real Redis, a real worker per model (two tiny cross-encoders of
different architectures, so their scores tell them apart), real producers, a real ``rerankq serve``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from rerankq import celeryconfig
from rerankq.celeryconfig import Settings
from rerankq.local import RerankqProcess, ServerProcess
from rerankq.producer import arerank, rerank, submit_many
from rerankq.redis_server import free_port
from rerankq.tasks import Result, UnknownModel, lanes
from rerankq.tasks import rerank as rerank_task
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.errors import Misrouted
from rerankq.tasks.router import RouteState, state_key
from rerankq.worker.stats import WorkerStats, workers_key
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue, rerankq

pytestmark = pytest.mark.integration

QUERY = "how do I feed a sourdough starter"
DOCS = ["feed the starter flour and water daily", "the river bank flooded", "a starter is wild yeast",
        "interest rates on a bank loan"]


@dataclass
class Deployment:
    alpha: str
    beta: str
    cpu: str
    env: dict[str, str]
    broker: BrokerRedis

    def waiting(self, queue: str) -> int:
        return sum(self.broker.client.llen(name) for name in self.broker.queue_lists(queue))


@pytest.fixture(scope="module")
def deployment(celery_app: Any, start_worker: StartWorker, tiny_model: Path, xlmr_model: Path,
               ) -> Iterator[Deployment]:
    """``alpha`` (the default; alias ``a``) and ``beta``, each served by its own worker; this process's
    producers configured like them."""
    alpha, beta, cpu = new_queue(), new_queue(), new_queue()
    spec = json.dumps([{"name": "alpha", "model": str(tiny_model), "queue": alpha, "aliases": ["a"]},
                       {"name": "beta", "model": str(xlmr_model), "queue": beta}])
    env = {"RERANKQ_MODELS": spec, "RERANKQ_CPU_QUEUE": cpu}
    start_worker("--model", "alpha", queue=alpha, **env)
    start_worker("--model", "beta", queue=beta, **env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeryconfig, "settings", Settings.from_env(env))
        patch.setattr(rerank_task, "router", None)
        patch.setattr(rerank_task, "_routers", {})
        broker = BrokerRedis(celery_app)
        yield Deployment(alpha, beta, cpu, env, broker)
        broker.close()


@pytest.fixture(scope="module")
def expected(tiny_model: Path, xlmr_model: Path) -> dict[str, list[float]]:
    scores = {name: [float(s) for s in CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in DOCS])]
              for name, path in (("alpha", tiny_model), ("beta", xlmr_model))}
    assert not np.allclose(scores["alpha"], scores["beta"], atol=1e-2)  # the two models tell apart
    return scores


def check(result: Result, model: str, expected: dict[str, list[float]]) -> None:
    assert result.model == model and result.ranker == "cross-encoder"
    np.testing.assert_allclose(result.scores, expected[model], atol=1e-5)


def test_each_call_is_scored_by_the_model_it_names_and_the_default_by_none(
        deployment: Deployment, expected: dict[str, list[float]]) -> None:
    check(rerank(QUERY, DOCS, model="alpha", timeout=60), "alpha", expected)
    check(rerank(QUERY, DOCS, model="beta", timeout=60), "beta", expected)
    check(rerank(QUERY, DOCS, timeout=60), "alpha", expected)
    check(rerank(QUERY, DOCS, model="a", timeout=60), "alpha", expected)  # an alias
    check(asyncio.run(arerank(QUERY, DOCS, model="beta", timeout=60)), "beta", expected)
    check(Result.from_dict(rerank_task.delay(QUERY, DOCS, model="beta").get(timeout=60)), "beta", expected)


def test_an_unknown_model_is_refused_before_anything_is_queued(deployment: Deployment) -> None:
    lists = [*deployment.broker.queue_lists(deployment.alpha), *deployment.broker.queue_lists(deployment.beta)]
    with pytest.raises(UnknownModel, match="'jina-reranker-v2' is not served here; served: alpha, beta"):
        rerank(QUERY, DOCS, model="jina-reranker-v2", timeout=5)
    with pytest.raises(UnknownModel, match="served: alpha, beta"):
        asyncio.run(arerank(QUERY, DOCS, model="jina-reranker-v2", timeout=5))
    with pytest.raises(UnknownModel):
        rerank_task.delay(QUERY, DOCS, model="nope")
    with pytest.raises(UnknownModel):
        next(submit_many([{"id": 1, "query": QUERY, "docs": DOCS}], model="nope"))
    assert sum(deployment.broker.client.llen(name) for name in lists) == 0


def test_a_bulk_run_sends_each_job_to_its_own_model(deployment: Deployment, expected: dict[str, list[float]]) -> None:
    jobs = [{"id": "default", "query": QUERY, "docs": DOCS}, {"id": "alpha", "query": QUERY, "docs": DOCS,
                                                               "model": "alpha"},
            {"id": "unknown", "query": QUERY, "docs": DOCS, "model": "gamma"}]
    got = dict(submit_many(jobs, model="beta"))
    assert isinstance(got["unknown"], UnknownModel)
    check(got["default"], "beta", expected)  # the run's model for a job naming none
    check(got["alpha"], "alpha", expected)


def test_rerankq_submit_takes_a_model_per_run_and_per_line(deployment: Deployment, redis_url: str, tmp_path: Path,
                                                          expected: dict[str, list[float]]) -> None:
    source, output = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": 1, "query": QUERY, "docs": DOCS}, {"id": 2, "query": QUERY, "docs": DOCS, "model": "a"},
             {"id": 3, "query": QUERY, "docs": DOCS, "model": "gamma"}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url, **deployment.env}
    done = rerankq("submit", str(source), "-o", str(output), "--model", "beta", env=env)
    assert done.returncode == 1, done.stderr  # one bad line
    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert (results[1]["model"], results[2]["model"]) == ("beta", "alpha")
    np.testing.assert_allclose(results[1]["scores"], expected["beta"], atol=1e-5)
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert errors[0]["line"] == 3 and "'gamma' is not served here" in errors[0]["error"]
    unknown = rerankq("submit", str(source), "-o", str(tmp_path / "none.jsonl"), "--model", "gamma", env=env)
    assert unknown.returncode == 2 and "model 'gamma' is not served here" in unknown.stderr


@pytest.fixture(scope="module")
def server(deployment: Deployment, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[ServerProcess]:
    process = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                          **deployment.env}, tmp_path_factory.mktemp("serve") / "serve.log")
    process.wait_ready()
    yield process
    process.stop()


def test_serve_answers_each_request_from_the_model_it_names_on_every_endpoint(
        server: ServerProcess, expected: dict[str, list[float]]) -> None:
    for path, model, answer in [("/v1/rerank", "beta", "beta"), ("/v2/rerank", "alpha", "alpha"),
                                ("/rerank", None, "alpha"), ("/v1/rerank", "a", "alpha")]:
        response = httpx.post(server.url + path, json={"query": QUERY, "documents": DOCS, "model": model},
                              timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["meta"]["model"] == response.headers["x-rerankq-model"] == answer
        scores = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([scores[i] for i in range(len(DOCS))], expected[answer], atol=1e-5)
    tei = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "model": "beta"}, timeout=60)
    assert tei.status_code == 200 and tei.headers["x-rerankq-model"] == "beta"
    np.testing.assert_allclose(sorted(r["score"] for r in tei.json()), sorted(expected["beta"]), atol=1e-5)


@pytest.mark.parametrize("body", [{"query": QUERY, "documents": DOCS, "model": "jina-reranker-v2"},
                                  {"query": QUERY, "texts": DOCS, "model": "jina-reranker-v2"}])
def test_serve_answers_an_unknown_model_404_naming_the_served_ones(server: ServerProcess, deployment: Deployment,
                                                                    body: dict[str, Any]) -> None:
    response = httpx.post(server.url + "/rerank", json=body, timeout=10)
    assert response.status_code == 404
    error = response.json()
    assert error["param"] == "model" and error["error_type"] == "not_found"
    assert "'jina-reranker-v2' is not served here; served: alpha, beta" in error["message"] == error["error"]
    assert deployment.waiting(deployment.alpha) == deployment.waiting(deployment.beta) == 0


def test_v1_models_lists_the_served_models_with_their_workers(server: ServerProcess) -> None:
    listed = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert listed["object"] == "list"
    cards = {card["id"]: card for card in listed["data"]}
    assert list(cards) == ["alpha", "beta"]
    assert cards["alpha"]["aliases"] == ["a"] and cards["alpha"]["default"] and not cards["beta"]["default"]
    assert all(card["object"] == "model" and card["live_workers"] == 1 and card["status"] == "ok"
               for card in cards.values())
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and set(health["models"]) == {"alpha", "beta"}


def test_the_cohere_sdk_gets_the_model_it_names(server: ServerProcess, expected: dict[str, list[float]]) -> None:
    answer = cohere.ClientV2(api_key="unused", base_url=server.url).rerank(model="beta", query=QUERY, documents=DOCS)
    assert [r.index for r in answer.results] == sorted(range(len(DOCS)), key=lambda i: -expected["beta"][i])
    with pytest.raises(cohere.core.ApiError) as refused:
        cohere.ClientV2(api_key="unused", base_url=server.url).rerank(model="rerank-v3.5", query=QUERY,
                                                                      documents=DOCS)
    assert refused.value.status_code == 404


def test_a_bulk_run_on_one_model_leaves_the_other_models_interactive_traffic_alone(
        start_worker: StartWorker, celery_app: Any) -> None:
    """Simulated GPUs: ``slow``'s bulk run is 16 jobs x 8 forward batches of 100 ms; ``quick``'s interactive
    jobs are all answered while most of it still waits."""
    slow, quick = new_queue(), new_queue()
    spec = json.dumps([{"name": "slow", "queue": slow}, {"name": "quick", "queue": quick}])
    env = {"RERANKQ_MODELS": spec, "RERANKQ_MAX_BATCH_TOKENS": "1", "RERANKQ_MAX_CHUNK_JOBS": "4"}
    start_worker("--ranker", "simulated", "--model", "latency_ms=100,token_us=0", "--served-name", "slow",
                 queue=slow, **env)
    start_worker("--ranker", "simulated", "--model", "latency_ms=1,token_us=0", "--served-name", "quick",
                 queue=quick, **env)
    docs = [f"doc {i}" for i in range(8)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeryconfig, "settings", Settings.from_env(env))
        patch.setattr(rerank_task, "_routers", {})
        runs = [rerank_task.apply_async((QUERY, docs), {"model": "slow"}, lane=lanes.BULK) for _ in range(16)]
        answers = [rerank(QUERY, docs, model="quick", timeout=30) for _ in range(10)]
    assert {(a.model, a.ranker) for a in answers} == {("quick", "simulated")}
    assert sum(handle.ready() for handle in runs) <= 8  # the bulk run is far from done
    assert all(Result.from_dict(h.get(timeout=120)).model == "slow" for h in runs)


def test_a_worker_naming_no_served_model_in_a_several_model_deployment_says_how_to(tmp_path: Path) -> None:
    env = {"RERANKQ_MODELS": "alpha=x,beta=y", "RERANKQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = rerankq("worker", "--model", str(tmp_path / "mine"), env=env)
    assert done.returncode == 2
    assert "is none of the served models (alpha, beta; RERANKQ_MODELS): add --served-name NAME" in done.stderr
    several = rerankq("worker", "--model", "alpha", "--model", "beta", env=env)
    assert several.returncode == 2 and "several --model need --gpus" in several.stderr


def test_workers_for_every_gpu_split_the_gpus_among_the_served_models(celery_app: Any, redis_url: str,
                                                                      tmp_path: Path) -> None:
    """``rerankq worker --gpus 0,1`` naming no model, with two served: one pinned worker per model (simulated
    GPUs run anywhere), each answering on its own queue under its own name."""
    first, second = new_queue(), new_queue()
    env = {"RERANKQ_MODELS": json.dumps([{"name": "first", "queue": first}, {"name": "second", "queue": second}]),
           "RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url, "RERANKQ_POLL_MS": "100"}
    supervisor = RerankqProcess(["worker", "--gpus", "0,1", "--ranker", "simulated", "--metrics-port", "0"], env,
                                tmp_path / "workers.log")
    try:
        eventually(lambda: "worker cuda:0 first: pid" in supervisor.log()
                   and "worker cuda:1 second: pid" in supervisor.log(), 30, "the split is printed")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(celeryconfig, "settings", Settings.from_env(env))
            patch.setattr(rerank_task, "_routers", {})
            patch.setattr(rerank_task, "router", None)
            answers = [rerank(QUERY, DOCS, model=name, timeout=60) for name in ("first", "second")]
        assert [(a.model, a.ranker) for a in answers] == [("first", "simulated"), ("second", "simulated")]
        broker = BrokerRedis(celery_app)

        def devices() -> dict[str, list[str]]:
            return {queue: [WorkerStats.decode(raw).device for raw in broker.client.hgetall(
                workers_key(broker, queue)).values()] for queue in (first, second)}
        try:
            eventually(lambda: all(devices().values()), 30, "both workers report")
            assert devices() == {first: ["cuda:0 fp32"], second: ["cuda:1 fp32"]}
        finally:
            broker.close()
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def test_a_job_reaching_a_queue_its_worker_gives_to_another_model_fails_unscored(
        start_worker: StartWorker, celery_app: Any) -> None:
    """The producer's RERANKQ_MODELS puts ``alpha`` on a queue that the worker's gives to ``omega`` (one process
    reordered the list): the job fails with ``Misrouted``, saying what to set, instead of being scored by omega."""
    queue = new_queue()
    producer_env = {"RERANKQ_MODELS": json.dumps([{"name": "alpha", "queue": queue}])}
    worker_env = {"RERANKQ_MODELS": json.dumps([{"name": "omega", "queue": queue}])}
    start_worker("--ranker", "simulated", "--model", "latency_ms=1,token_us=0", "--served-name", "omega",
                 queue=queue, **worker_env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeryconfig, "settings", Settings.from_env(producer_env))
        patch.setattr(rerank_task, "router", None)
        with pytest.raises(Misrouted, match=f"sent to model 'alpha' on {queue}, which this worker's RERANKQ_MODELS "
                                            "gives to 'omega': set the same RERANKQ_MODELS"):
            rerank(QUERY, DOCS, model="alpha", timeout=30)
        # Omitted, the model is the default: nothing was named, so nothing to check; served as always.
        assert rerank(QUERY, DOCS, timeout=30).model == "omega"
        # A caller choosing the queue itself names no model: served as always.
        assert rerank(QUERY, DOCS, queue=queue, timeout=30).model == "omega"


def test_a_job_named_for_the_model_a_worker_loads_under_another_name_is_served(
        start_worker: StartWorker, celery_app: Any, tiny_model: Path) -> None:
    """The producer's RERANKQ_MODELS calls the model ``bge``, the worker's ``bge-local``, both the same path: the
    same model, so served (the stamp carries the path too), by rerank and by submit_many."""
    queue = new_queue()
    producer_env = {"RERANKQ_MODELS": json.dumps([{"name": "bge", "model": str(tiny_model), "queue": queue}])}
    worker_env = {"RERANKQ_MODELS": json.dumps([{"name": "bge-local", "model": str(tiny_model), "queue": queue}])}
    start_worker("--model", str(tiny_model), queue=queue, **worker_env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeryconfig, "settings", Settings.from_env(producer_env))
        patch.setattr(rerank_task, "router", None)
        assert rerank(QUERY, DOCS, model="bge", timeout=30).ranker == "cross-encoder"
        outcomes = dict(submit_many([{"id": 1, "query": QUERY, "docs": DOCS, "model": "bge"}, {"id": 2, "query": QUERY,
                                                                                                  "docs": DOCS}]))
        assert all(isinstance(outcome, Result) for outcome in outcomes.values()), outcomes


def test_the_watchdog_sheds_one_models_traffic_while_the_other_stays_on_its_model(
        start_worker: StartWorker, start_watchdog: StartWatchdog, celery_app: Any) -> None:
    """Real workers (simulated GPUs, the real fast ranker) and a real watchdog: ``busy``'s backlog sheds its new
    jobs to the fast ranker while ``calm``, idle, stays on its own model."""
    calm, busy, cpu = new_queue(), new_queue(), new_queue()
    env = {"RERANKQ_MODELS": json.dumps([{"name": "calm", "queue": calm}, {"name": "busy", "queue": busy}]),
           "RERANKQ_CPU_QUEUE": cpu, "RERANKQ_POLL_MS": "100", "RERANKQ_HIGH_WAIT_S": "1.0",
           "RERANKQ_LOW_WAIT_S": "0.3", "RERANKQ_ROUTE_TTL_S": "1.0"}
    start_worker("--ranker", "simulated", "--model", "latency_ms=1,token_us=0", "--served-name", "calm", queue=calm,
                 **env)
    # 50 ms per job (one job per forward batch): 20 jobs/s.
    start_worker("--ranker", "simulated", "--model", "latency_ms=50,token_us=0", "--served-name", "busy", queue=busy,
                 RERANKQ_MAX_CHUNK_JOBS="1", **env)
    start_worker("--ranker", "fast", queue=cpu, **env)
    start_watchdog(**env)
    broker = BrokerRedis(celery_app)

    def route(queue: str) -> str | None:
        raw = broker.client.get(state_key(broker, queue))
        return RouteState.decode(raw).route if raw else None

    try:
        with pytest.MonkeyPatch.context() as patch:
            # Uncached, this process's routers see the shed the moment the test does.
            patch.setattr(celeryconfig, "settings", Settings.from_env({**env, "RERANKQ_ROUTE_CACHE_MS": "0"}))
            patch.setattr(rerank_task, "router", None)
            patch.setattr(rerank_task, "_routers", {})
            for name in ("calm", "busy", "calm", "busy"):  # both measure their speed
                assert rerank(QUERY, DOCS, model=name, timeout=30).model == name
            eventually(lambda: route(calm) == route(busy) == "gpu", 30, "both models routed to their queues")
            flood = [rerank_task.apply_async((QUERY, DOCS), {"model": "busy"}) for _ in range(60)]  # 3 s of work
            eventually(lambda: route(busy) == "shed", 10, "busy sheds")
            shed = rerank(QUERY, DOCS, model="busy", timeout=30)
            kept = rerank(QUERY, DOCS, model="calm", timeout=30)
            assert route(calm) == "gpu"
            assert (shed.ranker, kept.ranker, kept.model) == ("fast", "simulated", "calm")
            # Each flood job answered once, by busy or (those sent after the shed began) by the fast ranker.
            flooded = [Result.from_dict(h.get(timeout=60)) for h in flood]
            assert all(r.model == "busy" or r.ranker == "fast" for r in flooded)
            assert flooded[0].model == "busy"
    finally:
        broker.close()
