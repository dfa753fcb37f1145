"""Hostile input: random and malformed jobs, messages that are not JSON or claim pickle, oversized jobs.
Every case: a clear error for that job, and the worker keeps serving."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.messaging import Producer

from rerankq import celeryconfig
from rerankq.local import WorkerProcess
from rerankq.tasks import BadJob, DeadlineExceeded, Job, Result, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker import inflight
from tests.conftest import StartWorker

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
#: Text as hostile as JSON allows: NUL, control characters, surrogate-free Unicode of every plane.
HOSTILE_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
ARGS = st.one_of(
    st.lists(JSON, max_size=5),
    st.tuples(HOSTILE_TEXT, st.lists(HOSTILE_TEXT | JSON, max_size=6)),
    st.tuples(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=6), JSON, JSON),
)
KWARGS = st.dictionaries(st.sampled_from(["query", "docs", "top_k", "deadline", "raw_scores", "long_docs", "extra",
                                          ""]), JSON, max_size=3)


@given(args=ARGS, kwargs=KWARGS)
@settings(max_examples=500, deadline=None)
def test_any_call_is_a_valid_job_or_a_bad_job_never_another_error(args: Any, kwargs: Any) -> None:
    try:
        job = Job.from_call(args, kwargs, max_docs=1000)
    except BadJob as exc:
        assert str(exc)
        return
    assert isinstance(job.query, str) and job.query.strip()
    assert all(isinstance(doc, str) for doc in job.docs)
    assert job.top_k is None or job.top_k >= 1


@pytest.fixture(scope="module")
def worker(start_worker: StartWorker, tiny_model: Path) -> WorkerProcess:
    return start_worker("--model", str(tiny_model))


@pytest.fixture(scope="module")
def worker_queue(worker: WorkerProcess) -> str:
    return worker.queue


@pytest.mark.integration
@given(batch=st.lists(st.tuples(ARGS, KWARGS), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_jobs_each_get_a_result_or_a_bad_job_and_a_good_job_beside_them_succeeds(
        worker_queue: str, batch: list[tuple[Any, Any]]) -> None:
    """A valid job may carry a deadline already past (a small number): its one outcome is DeadlineExceeded."""
    handles = [rerank.apply_async(args, kwargs, queue=worker_queue) for args, kwargs in batch]
    good = rerank.apply_async(("bread", ["flour", "\x00 nul \u202e rtl \U0001F35E"]), queue=worker_queue)
    for handle in handles:
        outcome = handle.get(timeout=60, propagate=False)
        assert handle.successful() or isinstance(outcome, BadJob | DeadlineExceeded), outcome
    assert len(Result.from_dict(good.get(timeout=60)).scores) == 2


@pytest.mark.integration
@pytest.mark.parametrize(("args", "error"), [
    (("q", ["d"] * 100_000), "100000 docs is over the limit of 1000"),
    (("q", ["x" * 1_000_000]), None),  # one huge doc: truncated to the model's length, scored
    (("\x00", ["d"]), None),  # a NUL is text like any other
    (({"nested": [{"junk": None}]}, ["d"]), "query must be a string, got dict"),
    (("q", [["nested"]]), "docs[0] must be a string, got list"),
])
def test_extreme_jobs_get_a_clear_outcome(worker_queue: str, args: Any, error: str | None) -> None:
    handle = rerank.apply_async(args, queue=worker_queue)
    if error is None:
        assert len(Result.from_dict(handle.get(timeout=120)).scores) == len(args[1])
    else:
        with pytest.raises(BadJob) as raised:
            handle.get(timeout=60)
        assert error in str(raised.value)


class _Exploit:
    """Unpickling this would create a file: proof that a worker executed a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


@pytest.mark.integration
def test_messages_that_are_not_json_or_claim_pickle_are_refused_never_run(
        celery_app: Any, worker: WorkerProcess, worker_queue: str, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-was-executed"
    with Connection(celery_app.conf.broker_url) as connection:
        producer = Producer(connection.default_channel, exchange=Exchange(worker_queue, "direct"),
                            routing_key=worker_queue)
        for body, content_type in [
            (pickle.dumps(((_Exploit(marker),), {}, {})), "application/x-python-serialize"),
            (b"{not json", "application/json"),
            (b"\xff\xfe binary", "application/octet-stream"),
        ]:
            task_id = str(uuid.uuid4())
            producer.publish(body, content_type=content_type, content_encoding="binary",
                             headers={"task": "rerankq.rerank", "id": task_id, "lang": "py"}, declare=[])
    good = rerank.apply_async(("bread", ["flour"]), queue=worker_queue)
    assert Result.from_dict(good.get(timeout=60)).scores
    assert not marker.exists()
    log = worker.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert "Refusing to deserialize untrusted content of type application/octet-stream" in log
    assert "Expecting property name enclosed in double quotes" in log  # the broken JSON


@pytest.mark.integration
def test_queue_items_that_are_not_messages_are_dropped_and_the_worker_keeps_serving(
        celery_app: Any, worker: WorkerProcess, worker_queue: str) -> None:
    broker = BrokerRedis(celery_app)
    try:
        junk = [b"not json at all", b"123", b'{"no": "kombu envelope"}', b"\xff\xfe"]
        broker.client.lpush(broker.queue_lists(worker_queue)[0], *junk)
        good = rerank.apply_async(("bread", ["flour"]), queue=worker_queue)
        assert Result.from_dict(good.get(timeout=60)).scores
        assert worker.proc.poll() is None
        assert worker.log().count(f"dropped an item of queue {worker_queue}: not a message") == len(junk)
        in_flight = inflight.list_key(broker.prefix, worker.node, worker_queue)
        assert broker.client.hexists(inflight.registry_key(broker.prefix), in_flight)
        assert broker.client.llen(in_flight) == 0  # nothing to come back
    finally:
        broker.close()


def _published(celery_app: Any, queue: str, args: Any, kwargs: dict[str, Any]) -> AsyncResult:
    """A job put on ``queue`` by kombu itself, past every check rerankq's producer makes."""
    task_id = str(uuid.uuid4())
    with Connection(celery_app.conf.broker_url) as connection:
        producer = Producer(connection.default_channel, exchange=Exchange(queue, "direct"), routing_key=queue)
        producer.publish(json.dumps([args, kwargs, {}]), content_type="application/json", content_encoding="utf-8",
                         headers={"task": "rerankq.rerank", "id": task_id, "lang": "py"}, declare=[])
    return AsyncResult(task_id, app=celery_app)


@pytest.mark.integration
def test_a_query_over_the_limit_is_refused_by_the_producer_and_by_a_worker_before_tokenising(
        celery_app: Any, worker: WorkerProcess, worker_queue: str) -> None:
    """A 1 MB query beside 25 docs took a worker 15 s of tokenising (the query once per doc) before 2c4db98's
    next job could start; the limit refuses it where it is sent, and a worker that gets one anyway."""
    limit = celeryconfig.settings.max_query_chars
    with pytest.raises(BadJob, match=f"over the limit of {limit} \\(RERANKQ_MAX_QUERY_CHARS\\)"):
        rerank.apply_async(("q" * (limit + 1), ["d"]), queue="never-sent")
    with pytest.raises(BadJob, match="RERANKQ_MAX_QUERY_CHARS"):
        rerank.apply_async((), {"query": "q" * (limit + 1), "docs": ["d"]}, queue="never-sent")
    huge = _published(celery_app, worker_queue, ["bread " * 200_000, ["a"] * 25], {})
    good = rerank.apply_async(("bread", ["flour"]), queue=worker_queue)
    with pytest.raises(BadJob, match="RERANKQ_MAX_QUERY_CHARS"):
        huge.get(timeout=60)
    assert Result.from_dict(good.get(timeout=60)).scores


@pytest.mark.integration
def test_a_job_past_its_deadline_is_not_prepared(celery_app: Any, worker: WorkerProcess, worker_queue: str) -> None:
    """Its outcome is DeadlineExceeded before anything reads its docs: here one the job asks to refuse as too
    long, which a worker that prepared it first answered with BadJob."""
    late = _published(celery_app, worker_queue, ["bread", ["flour " * 5000]],
                      {"deadline": time.time() - 60, "long_docs": "refuse"})
    with pytest.raises(DeadlineExceeded, match="before a worker received this job"):
        late.get(timeout=60)


def test_an_oversized_job_is_refused_at_the_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(celeryconfig, "settings", celeryconfig.settings.with_(max_job_bytes=1000))
    with pytest.raises(BadJob, match="over RERANKQ_MAX_JOB_BYTES=1000: send fewer or shorter docs"):
        rerank.apply_async(("q", ["x" * 2000]), queue="never-sent")
