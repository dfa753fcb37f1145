"""The pipeline end to end: real Redis, a real `rerankq worker` process, a tiny cross-encoder on disk."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.exceptions import TaskRevokedError
from sentence_transformers import CrossEncoder

from rerankq.local import WorkerProcess
from rerankq.tasks import BadJob, DeadlineExceeded, RerankError, Result, rerank
from tests.conftest import StartWorker

pytestmark = pytest.mark.integration

BUDGET = 8192
BATCH_TOKENS = 2048
#: Long, so that a job held for chunk-mates shows in its queue time.
MAX_WAIT_MS = 1000
MAX_DOCS = 100
VOCABULARY = """cat dog river bank money loan interest rate sourdough bread flour yeast redis queue worker gpu batch
token model score query passage retrieval ranking latency throughput"""
WORDS = VOCABULARY.split()


def text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def worker(start_worker: StartWorker, tiny_model: Path) -> WorkerProcess:
    return start_worker("--model", str(tiny_model), RERANKQ_MAX_CHUNK_TOKENS=str(BUDGET),
                        RERANKQ_MAX_BATCH_TOKENS=str(BATCH_TOKENS), RERANKQ_MAX_WAIT_MS=str(MAX_WAIT_MS),
                        RERANKQ_MAX_DOCS=str(MAX_DOCS))


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Any:
    return CrossEncoder(str(tiny_model), device="cpu")


def send(worker: WorkerProcess, *args: Any, **kwargs: Any) -> Any:
    return rerank.apply_async(args, kwargs, queue=worker.queue)


def expected(reference: CrossEncoder, query: str, docs: list[str]) -> np.ndarray:
    return reference.predict([(query, d) for d in docs]) if docs else np.array([])


@pytest.fixture(scope="module")
def burst(worker: WorkerProcess) -> list[tuple[str, list[str], Result]]:
    """200 jobs of 0-60 docs of mixed lengths, sent at once from 4 threads."""
    rng = random.Random(7)
    jobs = [(text(rng, 1, 8), [text(rng, 1, 40) for _ in range(rng.randint(0, 60))]) for _ in range(200)]
    handles: list[Any] = [None] * len(jobs)

    def produce(offset: int) -> None:
        for i in range(offset, len(jobs), 4):
            handles[i] = send(worker, *jobs[i])

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [(q, docs, Result.from_dict(h.get(timeout=120))) for (q, docs), h in zip(jobs, handles, strict=True)]


def test_every_job_gets_exactly_its_own_scores_in_input_order(burst: Any, reference: CrossEncoder) -> None:
    all_expected: list[float] = []
    for query, docs, result in burst:
        want = expected(reference, query, docs)
        assert len(result.scores) == len(docs)
        np.testing.assert_allclose(result.scores, want, rtol=0, atol=1e-5)
        assert result.ranker == "cross-encoder"
        all_expected.extend(want)
    # The check above means something only if the scores tell docs apart.
    assert np.std(all_expected) > 0.05


def test_jobs_share_forward_batches_each_within_the_padded_token_budget(burst: Any) -> None:
    batches = {b.id: b for _, _, r in burst for b in r.batches}
    riders = Counter(b.id for _, _, r in burst for b in r.batches)
    shared = sum(info.jobs for info in batches.values()) / len(batches)
    assert shared >= 4, f"{shared:.1f} jobs per forward batch"
    for batch_id, info in batches.items():
        assert riders[batch_id] == info.jobs
        assert info.padded_tokens <= BATCH_TOKENS or info.pairs == 1


def test_each_bad_input_fails_only_its_own_job_with_its_message(worker: WorkerProcess,
                                                                reference: CrossEncoder) -> None:
    bad: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        ((123, ["a"]), {}, "query must be a string, got int"),
        (("", ["a"]), {}, "query is empty"),
        (("   ", ["a"]), {}, "query is empty"),
        (("q", "not a list"), {}, "docs must be a list of strings, got str"),
        (("q", ["ok", 7]), {}, "docs[1] must be a string, got int"),
        (("q", ["d"] * (MAX_DOCS + 1)), {}, f"{MAX_DOCS + 1} docs is over the limit of {MAX_DOCS}"),
        (("q", ["a"]), {"colour": "red"}, "unknown field 'colour'"),
        (("q", ["a"]), {"top_k": 0}, "top_k must be a positive integer"),
        (("q", ["a"]), {"top_k": "3"}, "top_k must be a positive integer"),
        (("q", ["a"]), {"deadline": "soon"}, "deadline must be a Unix time"),
        (("q",), {}, "missing 'docs'"),
        (("q", ["a"], None, None, False, None, None, "extra"), {}, "at most 7 arguments"),
        (("q", ["a"]), {"instruction": 3}, "instruction must be a string"),
    ]
    good = [(f"good query {i}", [f"passage {i} {j} about bread" for j in range(i + 1)]) for i in range(len(bad))]
    handles: list[tuple[Any, Any]] = []
    for (args, kwargs, message), (query, docs) in zip(bad, good, strict=True):
        handles.append((send(worker, *args, **kwargs), message))
        handles.append((send(worker, query, docs), (query, docs)))
    for handle, want in handles:
        if isinstance(want, str):
            with pytest.raises(BadJob) as caught:
                handle.get(timeout=60)
            assert want in str(caught.value)
            assert isinstance(caught.value, RerankError)
        else:
            result = Result.from_dict(handle.get(timeout=60))
            np.testing.assert_allclose(result.scores, expected(reference, *want), rtol=0, atol=1e-5)


def test_a_job_larger_than_the_window_runs_alone_in_forward_batches_within_the_budget(
        worker: WorkerProcess, reference: CrossEncoder) -> None:
    rng = random.Random(3)
    docs = [text(rng, 80, 120) for _ in range(MAX_DOCS)]
    result = Result.from_dict(send(worker, "what about the river bank", docs).get(timeout=120))
    assert sum(b.padded_tokens for b in result.batches) > BUDGET
    assert all(b.jobs == 1 and b.padded_tokens <= BATCH_TOKENS for b in result.batches)
    assert sum(b.pairs for b in result.batches) == MAX_DOCS
    np.testing.assert_allclose(result.scores, expected(reference, "what about the river bank", docs),
                               rtol=0, atol=1e-5)


def test_a_lone_job_is_served_without_waiting_for_chunk_mates(worker: WorkerProcess) -> None:
    time.sleep(0.5)  # let the worker go idle
    result = Result.from_dict(send(worker, "a lone query", ["one doc", "two docs"]).get(timeout=30))
    assert [b.jobs for b in result.batches] == [1]
    # Nothing else in sight: not held for chunk-mates at all (scheduling slack only).
    assert result.timings.queue_ms < MAX_WAIT_MS / 2


def test_empty_docs_give_empty_scores(worker: WorkerProcess) -> None:
    result = Result.from_dict(send(worker, "anything", [], top_k=3).get(timeout=30))
    assert result.scores == [] and result.top == []


def test_top_k_gives_the_best_indices_first(worker: WorkerProcess) -> None:
    docs = [f"doc {i} about loans and interest rates" * (i % 3 + 1) for i in range(8)]
    result = Result.from_dict(send(worker, "interest rate", docs, top_k=3).get(timeout=30))
    best = sorted(range(len(docs)), key=lambda i: -result.scores[i])[:3]
    assert result.top == best


def test_over_long_docs_are_truncated_not_rejected(worker: WorkerProcess, reference: CrossEncoder) -> None:
    docs = ["bank " * 3000, "short doc about a river bank"]
    result = Result.from_dict(send(worker, "river bank", docs).get(timeout=60))
    np.testing.assert_allclose(result.scores, expected(reference, "river bank", docs), rtol=0, atol=1e-5)


def test_a_job_past_its_deadline_is_not_scored(worker: WorkerProcess) -> None:
    handle = send(worker, "late", ["doc"], deadline=time.time() - 1)
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        handle.get(timeout=30)


def test_an_expired_job_is_skipped(worker: WorkerProcess) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    handle = rerank.apply_async(("expired", ["doc"]), queue=worker.queue, expires=past)
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=30)


def test_each_job_has_its_own_task_events(celery_app: Any, worker: WorkerProcess) -> None:
    seen: dict[str, list[str]] = {}

    def record(event: dict[str, Any]) -> None:
        if event["type"] != "task-sent":  # the producer's own event
            seen.setdefault(event.get("uuid", ""), []).append(event["type"])

    ready = threading.Event()
    with celery_app.connection_for_read() as conn:
        receiver = celery_app.events.Receiver(conn, handlers={"*": record})
        receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
        listener = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None})
        listener.start()
        try:
            assert ready.wait(10)
            # Redis delivers events only once the receiver has subscribed: wait until a probe's are seen.
            deadline = time.time() + 20
            while time.time() < deadline:
                send(worker, "probe", ["doc"]).get(timeout=30)
                time.sleep(0.3)
                if any("task-succeeded" in types for types in seen.values()):
                    break
            handles = [send(worker, f"query {i}", [f"doc {i}"]) for i in range(5)]
            failing = send(worker, "", ["x"])
            for h in handles:
                h.get(timeout=30)
            with pytest.raises(BadJob):
                failing.get(timeout=30)
            deadline = time.time() + 10
            while time.time() < deadline and any(len(seen.get(h.id, [])) < 3 for h in [*handles, failing]):
                time.sleep(0.05)
        finally:
            receiver.should_stop = True
            listener.join(10)
    for h in handles:
        assert seen[h.id] == ["task-received", "task-started", "task-succeeded"]
    assert seen[failing.id] == ["task-received", "task-started", "task-failed"]

