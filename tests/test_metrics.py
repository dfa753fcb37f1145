"""Prometheus metrics, scraped over HTTP from a real worker and a real watchdog before and after jobs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rerankq.redis_server import free_port
from tasks import Result, rerank
from tasks.connections import BrokerRedis
from tasks.router import Router
from tests.conftest import StartWatchdog, StartWorker, new_queue

pytestmark = pytest.mark.integration

QUERY, DOCS = "sourdough starter", ["a sourdough starter is flour and water", "a river bank", "bread " * 40]


def scrape(port: int) -> dict[str, float]:
    """Every sample, keyed like PromQL writes it: ``name{label="value",...}``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_a_workers_metrics_move_when_its_jobs_run(start_worker: StartWorker, tiny_model: Path) -> None:
    port = free_port()
    worker = start_worker("--model", str(tiny_model), "--metrics-port", str(port))
    before = scrape(port)
    assert before[f'rerankq_model_info{{device="cpu",model="{tiny_model}",ranker="cross-encoder"}}'] == 1
    assert before["rerankq_model_load_seconds"] > 0

    handles = [rerank.apply_async((QUERY, DOCS), queue=worker.queue) for _ in range(20)]
    handles.append(rerank.apply_async(("", DOCS), queue=worker.queue))  # an empty query: BadJob
    for handle in handles:
        handle.get(timeout=60, propagate=False)
    after = scrape(port)

    assert moved(before, after, 'rerankq_jobs_total{outcome="success"}') == 20
    assert moved(before, after, 'rerankq_jobs_total{outcome="BadJob"}') == 1
    assert moved(before, after, "rerankq_chunk_jobs_sum") == 21
    assert moved(before, after, "rerankq_chunk_pairs_sum") == 20 * len(DOCS)
    assert 1 <= moved(before, after, "rerankq_chunk_jobs_count") <= 21
    assert moved(before, after, "rerankq_inference_seconds_count") == moved(before, after, "rerankq_chunk_jobs_count")
    for histogram in ("rerankq_queue_wait_seconds", "rerankq_job_latency_seconds"):
        assert moved(before, after, f'{histogram}_count{{lane="interactive"}}') == 21
        assert moved(before, after, f'{histogram}_count{{lane="bulk"}}') == 0
    real = moved(before, after, "rerankq_real_tokens_total")
    padded = moved(before, after, "rerankq_padded_tokens_total")
    assert moved(before, after, "rerankq_forward_batch_pairs_sum") == 20 * len(DOCS)
    assert moved(before, after, "rerankq_forward_batch_padded_tokens_sum") == padded
    assert moved(before, after, "rerankq_forward_batch_pairs_count") >= 1
    assert 0 < moved(before, after, "rerankq_busy_seconds_total") <= moved(before, after,
                                                                          "rerankq_inference_seconds_sum")
    assert real == moved(before, after, "rerankq_chunk_tokens_sum")
    assert 0 < real < padded  # one long doc among short ones: some padding
    assert after["rerankq_jobs_held"] == 0


def test_the_watchdog_exports_route_queues_routed_counts_and_model_loads(
        celery_app: Any, start_worker: StartWorker, start_watchdog: StartWatchdog, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = new_queue(), new_queue()
    env = {"RERANKQ_GPU_QUEUE": gpu, "RERANKQ_CPU_QUEUE": cpu, "RERANKQ_POLL_MS": "100"}
    start_worker("--ranker", "simulated", queue=gpu, **env)
    failed = subprocess.run([sys.executable, "-m", "rerankq", "worker", "--queue", gpu, "--model",
                             str(tmp_path / "missing"), "--metrics-port", "0"],
                            env={**_worker_env(celery_app), **env}, capture_output=True, timeout=120)
    assert failed.returncode == 1
    port = free_port()
    start_watchdog(RERANKQ_METRICS_PORT=str(port), **env)
    broker = BrokerRedis(celery_app)
    router = Router(lambda: broker, gpu, cpu, cache_s=0.0, passthrough=True)
    monkeypatch.setattr(rerank, "router", router)

    def wait_for(expected: dict[str, float], timeout: float) -> None:
        seen: dict[str, float | None] = {}
        deadline = time.monotonic() + timeout
        while seen != expected:
            assert time.monotonic() < deadline, f"the watchdog's metrics after {timeout}s: {seen}"
            time.sleep(0.05)
            try:
                got = scrape(port)
            except httpx.TransportError:
                continue
            seen = {name: got.get(name) for name in expected}

    wait_for({f'rerankq_live_workers{{queue="{gpu}"}}': 1}, 30)
    results = [Result.from_dict(rerank.delay(QUERY, DOCS).get(timeout=60)) for _ in range(6)]
    assert {r.ranker for r in results} == {"simulated"}
    wait_for({
        # Each refresh carries the counts before it to Redis: the 6th job's carried the first 5.
        f'rerankq_routed_jobs_total{{destination="{gpu}"}}': 5,
        "rerankq_route_shed": 0,
        "rerankq_cpu_queue_open": 0,  # no CPU worker: shed jobs would get passthrough
        f'rerankq_live_workers{{queue="{cpu}"}}': 0,
        f'rerankq_estimated_wait_seconds{{queue="{cpu}"}}': float("inf"),
        f'rerankq_model_loads_total{{outcome="success",queue="{gpu}"}}': 1,
        f'rerankq_model_loads_total{{outcome="failure",queue="{gpu}"}}': 1,
    }, 10)
    broker.client.delete(*broker.queue_lists(gpu))
    broker.close()


def _worker_env(celery_app: Any) -> dict[str, str]:
    url = celery_app.conf.broker_url
    return {**os.environ, "RERANKQ_BROKER_URL": url, "RERANKQ_RESULT_BACKEND": url}


def test_a_metrics_port_in_use_stops_the_process_saying_what_to_do(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "rerankq", "watchdog", "--metrics-port", str(port)],
                              env={**os.environ, "RERANKQ_BROKER_URL": redis_url}, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 2
    assert f"cannot serve metrics on port {port}" in done.stderr and "its own RERANKQ_METRICS_PORT" in done.stderr


def test_the_grafana_dashboard_queries_only_metrics_rerankq_exports() -> None:
    import json

    from prometheus_client import REGISTRY

    import worker.metrics  # noqa: F401 - registers rerankq's metrics

    exported = {sample_name for family in REGISTRY.collect() for sample_name in _names(family)}
    exported |= {"rerankq_gpu_utilization_ratio", "rerankq_gpu_memory_bytes", "rerankq_gpu_memory_total_bytes"}
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:rerankq|process)_[a-z_]+)", expr)}
    assert used and used <= exported, used - exported


def _names(family: Any) -> set[str]:
    """A family's sample names, and for histograms the ``_bucket``/``_sum``/``_count`` series."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
    return {family.name + suffix for suffix in suffixes}
