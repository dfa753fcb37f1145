"""Workers killed, stopped, or failing inside the model, against a real Redis and real worker processes."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from rerankq.tasks import RankerFailed, Result, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker.stats import WorkerStats, workers_key
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue
from tests.faults.jobs import left_to_come_back, scored_once

pytestmark = pytest.mark.integration

JOB = ("bread", ["bread and flour", "a river bank"])


def simulated(latency_ms: float, **faults: str) -> tuple[str, ...]:
    spec = ",".join([f"latency_ms={latency_ms}", "token_us=0", *(f"{k}={v}" for k, v in faults.items())])
    return ("--ranker", "simulated", "--model", spec)


def waiting(broker: BrokerRedis, queue: str) -> int:
    return sum(broker.client.llen(name) for name in broker.queue_lists(queue))


def served(broker: BrokerRedis, queue: str, node: str) -> int:
    raw = broker.client.hget(workers_key(broker, queue), node)
    return WorkerStats.decode(raw).served if raw else 0


@pytest.fixture
def broker(celery_app: Any) -> Any:
    broker = BrokerRedis(celery_app)
    yield broker
    broker.close()


def test_a_worker_killed_mid_chunk_has_its_jobs_redelivered_and_completed(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue, env = new_queue(), {"RERANKQ_VISIBILITY_TIMEOUT": "3", "RERANKQ_POLL_MS": "100"}
    doomed = start_worker(*simulated(5000), queue=queue, **env)
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(6)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker took every job")
    time.sleep(0.5)  # its chunk of six is now in its 5 s inference
    doomed.kill()
    killed = time.monotonic()
    rescuer = start_worker(*simulated(1), queue=queue, **env)
    results = [Result.from_dict(h.get(timeout=60)) for h in handles]
    assert {r.ranker for r in results} == {"simulated"}
    # Back after the 3 s visibility timeout plus at most one restore scan (a tenth of it, at least 1 s).
    assert time.monotonic() - killed < 20
    ids = [h.id for h in handles]
    scored_once(lambda: served(broker, queue, rescuer.node), ids, lambda: left_to_come_back(broker, ids),
                4, "each job served exactly once")  # past the 3 s visibility timeout


def test_with_a_watchdog_a_killed_workers_jobs_are_back_in_seconds_not_after_the_visibility_timeout(
        start_worker: StartWorker, start_watchdog: StartWatchdog, broker: BrokerRedis) -> None:
    queue = new_queue()
    env = {"RERANKQ_GPU_QUEUE": queue, "RERANKQ_POLL_MS": "100"}  # the watchdog reclaims its queues' jobs
    doomed = start_worker(*simulated(5000), queue=queue, **env)
    start_watchdog(**env)
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(6)]
    eventually(lambda: waiting(broker, queue) == 0, 10, "the worker took every job")
    time.sleep(0.5)
    doomed.kill()
    killed = time.monotonic()
    rescuer = start_worker(*simulated(1), queue=queue, **env)
    assert {Result.from_dict(h.get(timeout=60)).ranker for h in handles} == {"simulated"}
    assert time.monotonic() - killed < 30  # the visibility timeout here is the default hour
    ids = [h.id for h in handles]
    scored_once(lambda: served(broker, queue, rescuer.node), ids, lambda: left_to_come_back(broker, ids),
                3, "each job served exactly once")  # past the reclaim's grace at 100 ms polls


def test_sigterm_finishes_the_running_chunk_and_returns_prefetched_jobs_at_once(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue = new_queue()
    # Chunks of at most 2, prefetch 6 (three chunks): the worker runs 1 or 2 (the first job runs at once
    # unless the second was already in sight) and holds the rest of the 6; 4 wait in Redis.
    stopping = start_worker(*simulated(1500), queue=queue, RERANKQ_MAX_CHUNK_JOBS="2")
    handles = [rerank.apply_async(JOB, queue=queue) for _ in range(10)]
    eventually(lambda: waiting(broker, queue) == 4, 10, "the worker holds 6 jobs")
    time.sleep(0.3)
    asked = time.monotonic()
    assert stopping.stop() == 0
    assert time.monotonic() - asked < 10
    finished = sum(h.ready() for h in handles)
    assert finished in (1, 2)  # the running chunk finished, and no other started
    assert waiting(broker, queue) == 10 - finished  # the prefetched ones are back at once, not after a timeout
    start_worker(*simulated(1), queue=queue)
    assert all(Result.from_dict(h.get(timeout=60)).ranker == "simulated" for h in handles)


def test_a_model_that_raises_on_one_job_fails_only_that_job(start_worker: StartWorker) -> None:
    worker = start_worker(*simulated(1, fail_on="POISON"))
    docs = [["bread"], ["flour and POISON"], ["yeast"], ["water", "salt"]]
    handles = [rerank.apply_async(("bread", d), queue=worker.queue) for d in docs * 4]
    for i, handle in enumerate(handles):
        if i % len(docs) == 1:
            with pytest.raises(RankerFailed, match="the simulated model failed on this job: RuntimeError"):
                handle.get(timeout=60)
        else:
            assert Result.from_dict(handle.get(timeout=60)).scores
    assert rerank.apply_async(JOB, queue=worker.queue).get(timeout=60)  # and it keeps serving


def test_out_of_memory_splits_the_batch_and_fails_a_job_only_if_one_pair_cannot_fit(
        start_worker: StartWorker) -> None:
    # Any forward batch over 40 padded tokens runs out of memory; a pair is query + doc words + 3.
    worker = start_worker(*simulated(1, oom_above="40"))
    fits = ["word " * 20] * 6  # 24 tokens a pair: one pair per batch fits, two do not
    too_long = ["word " * 50]  # 54 tokens: never fits
    handles = [rerank.apply_async(("q", fits), queue=worker.queue) for _ in range(3)]
    doomed = rerank.apply_async(("q", too_long), queue=worker.queue)
    for handle in handles:
        assert len(Result.from_dict(handle.get(timeout=60)).scores) == 6
    with pytest.raises(RankerFailed, match="out of memory"):
        doomed.get(timeout=60)


def _killed_while_receiving(start_worker: StartWorker, broker: BrokerRedis, queue: str, node: str) -> Any:
    """A job Redis handed to a worker that was killed before it read the reply (its socket still held it).

    The worker is frozen (SIGSTOP) while it waits on its queue, so the job goes to it and no further; if its
    wait ran out just as it froze, the job stays queued, and the worker is thawed to serve it and try again.
    """
    doomed = start_worker(*simulated(1), queue=queue, node=node, RERANKQ_POLL_MS="100")
    for _attempt in range(10):
        os.kill(doomed.proc.pid, signal.SIGSTOP)
        handle = rerank.apply_async(JOB, queue=queue)
        time.sleep(0.2)
        if waiting(broker, queue) == 0:
            doomed.kill()
            return handle
        os.kill(doomed.proc.pid, signal.SIGCONT)
        handle.get(timeout=30)
    raise AssertionError("the frozen worker never took a job")


def test_a_job_handed_to_a_worker_killed_before_reading_it_is_served_by_another(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue = new_queue()
    handle = _killed_while_receiving(start_worker, broker, queue, f"doomed.{queue}@localhost")
    killed = time.monotonic()
    start_worker(*simulated(1), queue=queue, RERANKQ_POLL_MS="100")
    # No watchdog, and the visibility timeout is the default hour: the rescuer puts the job back once the
    # dead worker has not reported for 10 s.
    assert Result.from_dict(handle.get(timeout=60)).ranker == "simulated"
    assert time.monotonic() - killed < 30


def test_a_worker_restarted_under_its_name_takes_back_its_job_in_flight_at_once(
        start_worker: StartWorker, broker: BrokerRedis) -> None:
    queue = new_queue()
    node = f"restarted.{queue}@localhost"
    handle = _killed_while_receiving(start_worker, broker, queue, node)
    restarted = start_worker(*simulated(1), queue=queue, node=node)
    assert Result.from_dict(handle.get(timeout=5)).ranker == "simulated"  # not after the 10 s grace
    assert "put back 1 job(s) a previous worker named" in restarted.log()
