"""Interactive and bulk lanes side by side: real Redis, real worker processes, a simulated GPU."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from rerankq.producer import submit_many
from rerankq.tasks import Result, lanes, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker.stats import WorkerStats, workers_key
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue
from tests.faults.jobs import left_to_come_back, scored_once

pytestmark = pytest.mark.integration

QUERY = "bread"
#: Eight docs: with one pair per forward batch (RERANKQ_MAX_BATCH_TOKENS=1), a job is eight forward batches.
DOCS = ["bread and flour", "a river bank", "yeast", "salt", "water", "an oven", "a starter", "rye"]


def simulated(latency_ms: float) -> tuple[str, ...]:
    return ("--ranker", "simulated", "--model", f"latency_ms={latency_ms},token_us=0")


def bulk(queue: str, n: int, docs: list[str] = DOCS) -> list[Any]:
    return [rerank.apply_async((QUERY, docs), queue=queue, lane="bulk") for _ in range(n)]


def waiting(broker: BrokerRedis, queue: str) -> int:
    return sum(broker.client.llen(name) for name in broker.queue_lists(queue))


def served(broker: BrokerRedis, queue: str) -> int:
    return sum(WorkerStats.decode(raw).served for raw in broker.client.hgetall(workers_key(broker, queue)).values())


@pytest.fixture
def broker(celery_app: Any) -> Any:
    broker = BrokerRedis(celery_app)
    yield broker
    broker.close()


def test_a_call_goes_to_the_interactive_lane_unless_it_asks_for_bulk(broker: BrokerRedis) -> None:
    queue = new_queue()
    rerank.apply_async((QUERY, DOCS), queue=queue)
    rerank.apply_async((QUERY, DOCS), queue=queue, lane="bulk")
    rerank.apply_async((QUERY, DOCS), queue=f"{queue}.bulk", lane="bulk")  # naming the bulk lane itself
    assert (waiting(broker, queue), waiting(broker, lanes.queue_for(queue, lanes.BULK))) == (1, 2)
    with pytest.raises(ValueError, match="lane must be 'interactive' or 'bulk', got 'fast'"):
        rerank.apply_async((QUERY, DOCS), queue=queue, lane="fast")
    broker.client.delete(*broker.queue_lists(queue), *broker.queue_lists(f"{queue}.bulk"))


def test_an_interactive_job_sent_while_a_bulk_run_saturates_a_worker_joins_the_next_forward_batch(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    # A window of 4 bulk jobs x 8 forward batches x 100 ms: 3.2 s of work; the worker holds 8 bulk jobs.
    worker = start_worker(*simulated(100), RERANKQ_MAX_CHUNK_JOBS="4", RERANKQ_MAX_BATCH_TOKENS="1")
    runs = bulk(worker.queue, 16)
    bulk_lane = lanes.queue_for(worker.queue, lanes.BULK)
    eventually(lambda: waiting(broker, bulk_lane) == 16 - 8, 10, "the worker holds its bulk limit")
    time.sleep(0.5)  # the first bulk jobs are in their forward batches

    interactive = rerank.apply_async((QUERY, ["bread and flour"]), queue=worker.queue)
    result = Result.from_dict(interactive.get(timeout=30))

    assert result.ranker == "simulated"
    assert not any(handle.ready() for handle in runs)  # it went in between the bulk jobs' forward batches
    assert result.timings.queue_ms < 1600  # a batch or two running when it came, not the 3.2 s of bulk work
    assert waiting(broker, bulk_lane) == 16 - 8  # and ahead of every bulk job still queued
    assert all(Result.from_dict(h.get(timeout=60)).ranker == "simulated" for h in runs)


def test_a_worker_full_of_bulk_jobs_receives_interactive_ones_and_runs_them_first(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    # One bulk job in the window, 300 ms a batch; the worker holds 2 bulk jobs and keeps room for 1 interactive.
    worker = start_worker(*simulated(300), RERANKQ_MAX_CHUNK_JOBS="1")
    runs = bulk(worker.queue, 10, docs=["bread"])
    eventually(lambda: waiting(broker, lanes.queue_for(worker.queue, lanes.BULK)) == 8, 10, "two bulk jobs held")
    interactive = [rerank.apply_async((QUERY, ["flour"]), queue=worker.queue) for _ in range(3)]
    for handle in interactive:
        handle.get(timeout=30)
    # Each interactive job waited for at most the bulk job running when it came: the three took at most
    # three bulk batches' time together, so at most three bulk jobs finished meanwhile, of ten.
    assert sum(handle.ready() for handle in runs) <= 4
    assert all(Result.from_dict(h.get(timeout=60)).ranker == "simulated" for h in runs)


def test_a_bulk_run_alone_fills_whole_forward_batches_like_the_same_run_sent_interactive(
        start_worker: StartWorker) -> None:
    worker = start_worker(*simulated(200), RERANKQ_MAX_CHUNK_JOBS="4")

    def batch_sizes(handles: list[Any]) -> list[int]:
        batches = {}
        for handle in handles:
            for batch in Result.from_dict(handle.get(timeout=60)).batches:
                batches[batch.id] = batch.jobs
        return sorted(batches.values())

    plain = batch_sizes([rerank.apply_async((QUERY, DOCS), queue=worker.queue) for _ in range(17)])
    as_bulk = batch_sizes(bulk(worker.queue, 17))
    # The first job or two run at once (each alone, while the rest are still being sent), then a full window
    # per batch, 17 jobs in at most 2 + 4 batches: bulk is not held back when nothing else waits.
    for sizes in (plain, as_bulk):
        assert sum(size == 4 for size in sizes) >= 3 and len(sizes) <= 6, sizes


def test_two_bulk_runs_at_once_both_make_progress(start_worker: StartWorker) -> None:
    worker = start_worker(*simulated(50), RERANKQ_MAX_CHUNK_JOBS="2")
    arrivals: list[str] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        jobs = [{"id": n, "query": QUERY, "docs": ["bread"]} for n in range(20)]
        for _id, outcome in submit_many(jobs, max_in_flight=4, queue=worker.queue):
            assert isinstance(outcome, Result)
            with lock:
                arrivals.append(name)

    runs = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(60)
    assert sorted(arrivals) == ["first"] * 20 + ["second"] * 20
    # Neither waited for the other to finish: each had results in the first half of all the results.
    assert {"first", "second"} <= set(arrivals[:20])


def test_a_worker_killed_holding_both_lanes_loses_nothing_and_scores_each_job_once(
        start_worker: StartWorker, start_watchdog: StartWatchdog, broker: BrokerRedis) -> None:
    queue = new_queue()
    env = {"RERANKQ_GPU_QUEUE": queue, "RERANKQ_POLL_MS": "100"}  # the watchdog reclaims both lanes
    doomed = start_worker(*simulated(5000), queue=queue, RERANKQ_MAX_CHUNK_JOBS="4", **env)
    start_watchdog(**env)
    runs = bulk(queue, 8)
    eventually(lambda: waiting(broker, lanes.queue_for(queue, lanes.BULK)) == 0, 10, "the worker took the bulk jobs")
    interactive = [rerank.apply_async((QUERY, DOCS), queue=queue) for _ in range(3)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker took the interactive jobs")
    time.sleep(0.5)  # a forward batch is in its 5 s, the other jobs held
    doomed.kill()
    rescuer = start_worker(*simulated(1), queue=queue, **env)
    handles = runs + interactive
    assert {Result.from_dict(h.get(timeout=60)).ranker for h in handles} == {"simulated"}
    ids = [h.id for h in handles]
    scored_once(lambda: served(broker, queue), ids, lambda: left_to_come_back(broker, ids), 3,
                "each job scored once, by the rescuer")
    report = broker.client.hget(workers_key(broker, queue), rescuer.node)
    assert report is not None and WorkerStats.decode(report).served == len(handles)
