"""OpenTelemetry traces of jobs: the producer's send (this process, the SDK's in-memory exporter) and the
worker's spans under it (a real worker, `RERANKQ_TRACING=console`, one JSON line per span in its log)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rerankq.local import RerankqProcess, ServerProcess, WorkerProcess
from rerankq.producer import arerank, rerank
from rerankq.redis_server import free_port
from rerankq.tasks import BadJob
from rerankq.tasks.records import BatchInfo
from rerankq.tasks.tracing import settled
from tests.conftest import StartWorker, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider (set once per process, as an app would), into memory."""
    exporter = InMemorySpanExporter()
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture(scope="module")
def traced(start_worker: StartWorker, tiny_model: Path) -> WorkerProcess:
    return start_worker("--model", str(tiny_model), RERANKQ_TRACING="console")


def worker_spans(worker: RerankqProcess) -> list[dict[str, Any]]:
    found = []
    for line in worker.log().splitlines():
        if line.startswith('{"name": "rerankq '):
            found.append(json.loads(line))
    return found


def test_a_jobs_trace_runs_from_the_callers_span_through_the_send_to_the_workers_spans(
        spans: InMemorySpanExporter, traced: WorkerProcess) -> None:
    tracer = trace.get_tracer("the web app")
    with tracer.start_as_current_span("POST /search") as request_span:
        result = rerank("bread", ["flour and water", "a river bank"], queue=traced.queue)
    trace_id = f"0x{request_span.get_span_context().trace_id:032x}"
    [send] = [s for s in spans.get_finished_spans() if s.name == "rerankq send"
              and s.context is not None and s.context.trace_id == request_span.get_span_context().trace_id]
    assert send.parent is not None and send.parent.span_id == request_span.get_span_context().span_id
    assert send.attributes is not None and send.attributes["messaging.destination.name"] == traced.queue

    def recorded() -> list[dict[str, Any]]:
        return [s for s in worker_spans(traced) if s["context"]["trace_id"] == trace_id]
    eventually(lambda: len(recorded()) == 3, 30, "the worker's three spans in its log")
    by_name = {s["name"]: s for s in recorded()}
    job = by_name["rerankq job"]
    assert job["parent_id"] == f"0x{send.context.span_id:016x}" if send.context else False
    assert job["kind"] == "SpanKind.CONSUMER" and job["status"]["status_code"] == "UNSET"
    assert job["attributes"]["rerankq.ranker"] == "cross-encoder" and job["attributes"]["rerankq.docs"] == 2
    for child in ("rerankq queue wait", "rerankq inference"):
        assert by_name[child]["parent_id"] == job["context"]["span_id"]
    inference = by_name["rerankq inference"]
    assert inference["attributes"]["rerankq.forward_batches"] == [b.id for b in result.batches]
    assert job["start_time"] <= inference["start_time"] <= inference["end_time"] == job["end_time"]


def test_an_awaited_job_joins_the_callers_trace_too(spans: InMemorySpanExporter, traced: WorkerProcess) -> None:
    async def search() -> tuple[int, int]:
        with trace.get_tracer("the web app").start_as_current_span("GET /search") as request_span:
            await arerank("bread", ["flour"], queue=traced.queue)
            return request_span.get_span_context().trace_id, request_span.get_span_context().span_id

    trace_id, span_id = asyncio.run(search())
    [send] = [s for s in spans.get_finished_spans() if s.name == "rerankq send" and s.context is not None
              and s.context.trace_id == trace_id]
    assert send.parent is not None and send.parent.span_id == span_id


def test_rerankq_serve_joins_the_trace_an_http_request_carries(traced: WorkerProcess, redis_url: str,
                                                               tmp_path: Path) -> None:
    server = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                         "RERANKQ_GPU_QUEUE": traced.queue, "RERANKQ_TRACING": "console"},
                           tmp_path / "serve.log")
    try:
        server.wait_ready()
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        response = httpx.post(f"{server.url}/v1/rerank", json={"query": "bread", "documents": ["flour"]},
                              headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert response.status_code == 200, response.text
        sends = [s for s in worker_spans(server) if s["name"] == "rerankq send"]
        assert sends and sends[-1]["context"]["trace_id"] == f"0x{trace_id}"
        assert sends[-1]["parent_id"] == "0x00f067aa0ba902b7"
        eventually(lambda: any(s["context"]["trace_id"] == f"0x{trace_id}" and s["name"] == "rerankq job"
                               for s in worker_spans(traced)), 30, "the worker's job span in the same trace")
    finally:
        server.stop()


def test_a_failed_job_is_an_error_span(spans: InMemorySpanExporter, traced: WorkerProcess) -> None:
    tracer = trace.get_tracer("the web app")
    with tracer.start_as_current_span("POST /search") as request_span, pytest.raises(BadJob):
        rerank("   ", ["d"], queue=traced.queue)
    trace_id = f"0x{request_span.get_span_context().trace_id:032x}"

    def job() -> list[dict[str, Any]]:
        return [s for s in worker_spans(traced) if s["context"]["trace_id"] == trace_id and s["name"] == "rerankq job"]
    eventually(lambda: len(job()) == 1, 30, "the failed job's span")
    assert job()[0]["status"]["status_code"] == "ERROR" and "query is empty" in job()[0]["status"]["description"]


def test_a_job_sent_without_a_trace_gets_a_trace_of_its_own_with_its_times(
        spans: InMemorySpanExporter) -> None:
    spans.clear()
    settled({}, "job-1", {"rerankq.docs": 1}, 100.0, 100.5, 101.0, [BatchInfo("w#1", 1, 1, 8)], None)
    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    assert [s.name for s in finished] == ["rerankq queue wait", "rerankq inference", "rerankq job"]
    job = finished[-1]
    assert job.parent is None and job.start_time == 100 * 10**9 and job.end_time == 101 * 10**9
