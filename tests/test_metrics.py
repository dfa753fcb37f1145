"""Prometheus metrics, scraped over HTTP from a real worker and a real watchdog before and after jobs."""

from __future__ import annotations

import contextlib
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

from rerankq.celeryconfig import DEFAULT_MODEL, Settings
from rerankq.redis_server import free_port
from rerankq.status import gather
from rerankq.tasks import Result, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import Router
from rerankq.worker import metrics
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue

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
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200  # loaded: a probe passes

    began = time.perf_counter()
    handles = [rerank.apply_async((QUERY, DOCS), queue=worker.queue) for _ in range(20)]
    handles.append(rerank.apply_async(("", DOCS), queue=worker.queue))  # an empty query: BadJob
    for handle in handles:
        handle.get(timeout=60, propagate=False)
    after, wall_s = scrape(port), time.perf_counter() - began

    assert moved(before, after, 'rerankq_jobs_total{outcome="success"}') == 20
    assert moved(before, after, 'rerankq_jobs_total{outcome="BadJob"}') == 1
    batches = moved(before, after, "rerankq_forward_batch_pairs_count")
    assert batches >= 1 and moved(before, after, "rerankq_forward_batch_jobs_count") == batches
    riders = moved(before, after, "rerankq_forward_batch_jobs_sum")  # each scored job, in each batch it rode
    assert riders >= 20 and riders > batches  # jobs shared forward batches
    assert moved(before, after, "rerankq_inference_seconds_count") == 20  # the bad job was never scored
    for histogram in ("rerankq_queue_wait_seconds", "rerankq_job_latency_seconds"):
        assert moved(before, after, f'{histogram}_count{{lane="interactive"}}') == 21
        assert moved(before, after, f'{histogram}_count{{lane="bulk"}}') == 0
    real = moved(before, after, "rerankq_real_tokens_total")
    padded = moved(before, after, "rerankq_padded_tokens_total")
    assert moved(before, after, "rerankq_forward_batch_pairs_sum") == 20 * len(DOCS)
    assert moved(before, after, "rerankq_forward_batch_padded_tokens_sum") == padded
    assert 0 < moved(before, after, "rerankq_busy_seconds_total") < wall_s
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
    port = free_port()  # the watchdog's: it starts 20 above RERANKQ_METRICS_PORT
    start_watchdog(RERANKQ_METRICS_PORT=str(port - metrics.KIND_OFFSETS["watchdog"]), **env)
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
        f'rerankq_routed_jobs_total{{destination="{gpu}",model="{DEFAULT_MODEL}"}}': 5,
        f'rerankq_route_shed{{model="{DEFAULT_MODEL}"}}': 0,
        f'rerankq_cpu_queue_open{{queue="{cpu}"}}': 0,  # no CPU worker: shed jobs would get passthrough
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


def test_processes_with_default_ports_on_one_host_each_serve_metrics_on_their_own_and_say_where(
        celery_app: Any, start_worker: StartWorker, start_watchdog: StartWatchdog) -> None:
    base = free_port_run(30)
    gpu, cpu = new_queue(), new_queue()
    env = {"RERANKQ_METRICS_PORT": str(base), "RERANKQ_GPU_QUEUE": gpu, "RERANKQ_CPU_QUEUE": cpu,
           "RERANKQ_POLL_MS": "100"}
    watchdog = start_watchdog(**env)
    first = start_worker("--ranker", "simulated", queue=gpu, **env)
    second = start_worker("--ranker", "simulated", queue=gpu, **env)  # the same default port: taken

    # On this machine's loopback only, unless RERANKQ_METRICS_ADDRESS says otherwise.
    assert f"metrics on http://127.0.0.1:{base}/metrics" in first.log()
    assert f"metrics on http://127.0.0.1:{base + 1}/metrics (port {base} is in use)" in second.log()
    eventually(lambda: f"metrics on http://127.0.0.1:{base + 20}/metrics" in watchdog.log(), 10, "watchdog's port")
    for port in (base, base + 1, base + 20):
        assert "rerankq_" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    broker = BrokerRedis(celery_app)
    try:
        eventually(lambda: len(gather(broker, Settings.from_env(env))["workers"]) == 2, 10, "both workers report")
        status = gather(broker, Settings.from_env(env))
    finally:
        broker.close()
    assert sorted(w["metrics_port"] for w in status["workers"]) == [base, base + 1]
    assert status["route"]["metrics_port"] == base + 20


def test_a_process_whose_metrics_ports_are_all_taken_serves_without_them_and_says_so() -> None:
    with contextlib.ExitStack() as stack:
        base = free_port_run(metrics.PORT_TRIES)
        for port in range(base, base + metrics.PORT_TRIES):
            taken = stack.enter_context(socket.socket())
            taken.bind(("0.0.0.0", port))
            taken.listen()
        assert metrics.serve(base) == 0
    assert "ports" in metrics.describe(base, 0) and "all in use" in metrics.describe(base, 0)


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive ports free now."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(_free(port) for port in range(base, base + n)):
            return base
    raise AssertionError(f"no run of {n} free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_the_grafana_dashboard_queries_only_metrics_rerankq_exports() -> None:
    import json

    from prometheus_client import REGISTRY

    import rerankq.worker.metrics  # noqa: F401 - registers rerankq's metrics

    exported = {sample_name for family in REGISTRY.collect() for sample_name in _names(family)}
    exported |= {family.name for family in metrics.GpuCollector().describe()}  # registered on CUDA workers only
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:rerankq|process)_[a-z_]+)", expr)}
    assert used and used <= exported, used - exported


def _names(family: Any) -> set[str]:
    """A family's sample names, and for histograms the ``_bucket``/``_sum``/``_count`` series."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
    return {family.name + suffix for suffix in suffixes}


def test_the_gpu_utilisation_is_the_mean_of_the_samples_since_the_last_scrape() -> None:
    from rerankq.worker.metrics import Sampled

    sampled = Sampled()
    assert sampled.take() is None  # nothing sampled (no NVML): the gauge is left out
    for value in (0.2, 1.0, 0.6):
        sampled.add(value)
    assert sampled.take() == pytest.approx(0.6)
    assert sampled.take() == pytest.approx(0.6)  # no sample since: the last one, not nothing
    sampled.add(0.0)
    assert sampled.take() == 0.0


def test_healthz_answers_503_until_the_process_serves_and_while_its_work_is_stalled() -> None:
    from rerankq.worker import metrics

    def call(path: str) -> tuple[str, bytes]:
        status: list[str] = []
        body = b"".join(app({"PATH_INFO": path}, lambda s, headers: status.append(s)))
        return status[0], body

    app = metrics._with_healthz(lambda environ, start_response: start_response("200 OK", []) or [b"metrics"])
    work, metrics.WORK = metrics.WORK, metrics.Work(limit_s=0.05)
    metrics.READY.clear()
    try:
        assert call("/healthz") == ("503 Service Unavailable", b"starting\n")
        assert call("/metrics") == ("200 OK", b"metrics")
        metrics.READY.set()
        assert call("/healthz") == ("200 OK", b"ok\n")
        metrics.WORK.begin()  # a forward batch starts
        assert call("/healthz") == ("200 OK", b"ok\n")
        time.sleep(0.1)  # and never ends: a GPU sync that does not return
        assert call("/healthz") == ("503 Service Unavailable", b"stalled\n")
        metrics.WORK.end()
        assert call("/healthz") == ("200 OK", b"ok\n")  # idle again: healthy however long it idles
    finally:
        metrics.READY.clear()
        metrics.WORK = work


def test_idle_connections_cannot_stall_the_metrics_server() -> None:
    from rerankq.worker import metrics

    port = metrics.serve(free_port())
    assert port
    over = 4
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_CONNECTIONS + over)]
    try:  # connections that send nothing: those past the limit closed at once, the others after REQUEST_S
        time.sleep(0.5)  # the checks below take well under REQUEST_S, a loaded machine's lag included
        assert [_closed(c, 0.02) for c in idle] == [False] * metrics.MAX_CONNECTIONS + [True] * over
        assert not _answers(port)  # every slot taken: refused, not queued behind them
        time.sleep(metrics.REQUEST_S)
        assert all(_closed(c) for c in idle)
        assert _answers(port)
    finally:
        for connection in idle:
            connection.close()


def _closed(connection: socket.socket, wait: float = 0.1) -> bool:
    connection.settimeout(wait)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
