"""Forward-batch scheduling with real Redis and a real worker process (the simulated GPU: each forward batch
sleeps, so what runs when is plain to see). With ``RERANKQ_MAX_BATCH_TOKENS=1`` every forward batch holds
one pair, so a job of N docs is N forward batches."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from rerankq.local import WorkerProcess
from rerankq.tasks import RankerFailed, Result, rerank
from rerankq.tasks.errors import DeviceLost
from rerankq.worker.runner import DEVICE_LOST_EXIT
from tests.conftest import StartWorker, eventually

pytestmark = pytest.mark.integration

BATCH_MS = 100


def simulated(latency_ms: float = BATCH_MS, **faults: str) -> tuple[str, ...]:
    spec = ",".join([f"latency_ms={latency_ms}", "token_us=0", *(f"{k}={v}" for k, v in faults.items())])
    return ("--ranker", "simulated", "--model", spec)


def docs(n: int, word: str = "bread") -> list[str]:
    return [f"{word} number {i}" for i in range(n)]


def result(handle: Any) -> Result:
    return Result.from_dict(handle.get(timeout=60))


@pytest.fixture(scope="module")
def worker(start_worker: StartWorker) -> Any:
    return start_worker(*simulated(), RERANKQ_MAX_BATCH_TOKENS="1")


def test_a_job_sent_while_a_long_job_runs_starts_and_finishes_before_the_long_one_ends(worker: Any) -> None:
    long_job = rerank.apply_async(("bread", docs(20)), queue=worker.queue)  # 20 batches: 2 s
    time.sleep(5 * BATCH_MS / 1000)
    short = rerank.apply_async(("bread", docs(2)), queue=worker.queue)
    short_result = result(short)
    assert not long_job.ready()  # it did not wait for the long job's remaining batches
    assert short_result.timings.queue_ms < 5 * BATCH_MS  # a batch or two, not the 1.5 s of the long job left
    assert short_result.scores == [1.0, 1.0]
    long_result = result(long_job)
    assert len(long_result.batches) == 20 and long_result.scores == [1.0] * 20
    # The long job's batches ran on while the short one's came in between.
    assert {b.id for b in short_result.batches}.isdisjoint({b.id for b in long_result.batches})


def test_a_jobs_result_arrives_before_its_batch_mates_when_its_pairs_finish_first(worker: Any) -> None:
    # Sent together, these arrive in one window; the small one's two pairs are done first.
    big, small = (rerank.apply_async(("bread", docs(n)), queue=worker.queue) for n in (12, 2))
    eventually(small.ready, 10, "the small job's result")
    assert not big.ready()
    assert len(result(big).scores) == 12 and len(result(small).scores) == 2


def test_a_job_that_fails_mid_run_fails_alone_and_the_jobs_in_progress_go_on(start_worker: StartWorker) -> None:
    worker = start_worker(*simulated(50, fail_on="POISON"), RERANKQ_MAX_BATCH_TOKENS="64")
    running = [rerank.apply_async(("bread", docs(30)), queue=worker.queue) for _ in range(3)]
    time.sleep(0.2)  # their forward batches are under way
    poisoned = rerank.apply_async(("bread", [*docs(3), "flour and POISON"]), queue=worker.queue)
    late = rerank.apply_async(("bread", docs(4)), queue=worker.queue)
    with pytest.raises(RankerFailed, match="the simulated model failed on this job"):
        poisoned.get(timeout=60)
    for handle in [*running, late]:
        assert set(result(handle).scores) == {1.0}


def test_out_of_memory_mid_run_splits_the_batch_and_fails_only_a_pair_that_never_fits(
        start_worker: StartWorker) -> None:
    # Any forward batch over 100 padded tokens runs out of memory: the 200-token budget is too large.
    worker = start_worker(*simulated(20, oom_above="100"), RERANKQ_MAX_BATCH_TOKENS="200")
    running = [rerank.apply_async(("bread", docs(20)), queue=worker.queue) for _ in range(2)]
    time.sleep(0.1)
    doomed = rerank.apply_async(("bread", ["word " * 120]), queue=worker.queue)
    joined = rerank.apply_async(("bread", docs(6)), queue=worker.queue)
    with pytest.raises(RankerFailed, match="out of memory"):
        doomed.get(timeout=60)
    for handle in [*running, joined]:
        assert set(result(handle).scores) == {1.0}


def test_after_out_of_memory_batches_stay_under_the_size_that_ran_out(start_worker: StartWorker) -> None:
    # Batches over 100 padded tokens run out of memory; the budget says 400. Pairs of 8 tokens (RERANKQ_MAX_LENGTH).
    worker = start_worker(*simulated(5, oom_above="100"), RERANKQ_MAX_BATCH_TOKENS="400", RERANKQ_MAX_LENGTH="8",
                          RERANKQ_TARGET_BATCH_MS="0")
    first = result(rerank.apply_async(("bread", docs(40)), queue=worker.queue))
    assert max(b.padded_tokens for b in first.batches) > 100  # it ran out, and was split
    then = result(rerank.apply_async(("bread", docs(40)), queue=worker.queue))
    assert set(then.scores) == {1.0}
    assert max(b.padded_tokens for b in then.batches) <= 100, then.batches  # lowered: none ran out


def test_the_next_batch_is_prepared_while_one_runs_on_the_device(start_worker: StartWorker, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    worker = start_worker(*simulated(BATCH_MS / 2, trace=str(trace)), RERANKQ_MAX_BATCH_TOKENS="1")
    assert len(result(rerank.apply_async(("bread", docs(6)), queue=worker.queue)).batches) == 6  # alone: 6 in a row
    steps: dict[tuple[str, int], float] = {}
    for line in trace.read_text().splitlines():
        step, batch, at = line.split()
        steps[step, int(batch)] = float(at)
    ran = sorted(n for step, n in steps if step == "read")
    assert len(ran) == 6, steps
    for before, after in itertools.pairwise(ran):
        # Padded while the one before ran (after it was launched, before its scores were read); launched after.
        assert steps["launch", before] < steps["prepare", after] < steps["read", before] <= steps["launch", after]


def test_a_warm_shutdown_ends_after_the_running_batch_and_a_large_job_in_progress_goes_back(
        start_worker: StartWorker) -> None:
    stopping = start_worker(*simulated(), RERANKQ_MAX_BATCH_TOKENS="1")
    large = rerank.apply_async(("bread", docs(50)), queue=stopping.queue)  # 50 batches: 5 s
    time.sleep(5 * BATCH_MS / 1000)
    asked = time.monotonic()
    assert stopping.stop() == 0
    assert time.monotonic() - asked < 3.5  # one batch and the shutdown, not the 4.5 s of work left
    assert not large.ready()
    start_worker(*simulated(1), queue=stopping.queue)
    assert result(large).scores == [1.0] * 50


def test_a_job_the_model_scores_nan_fails_alone_saying_so(start_worker: StartWorker) -> None:
    """A non-finite score (an fp16 overflow, a broken model) fails its job alone: before, the NaN went into the
    result, and `rerankq serve` could not encode the answer (500)."""
    worker = start_worker(*simulated(1, nan_on="OVERFLOW"))
    mates = [rerank.apply_async(("bread", docs(3)), queue=worker.queue) for _ in range(3)]
    broken = rerank.apply_async(("bread", [*docs(2), "flour OVERFLOW"]), queue=worker.queue)
    with pytest.raises(RankerFailed, match=r"non-finite score \(nan\) for doc 2 of this job"):
        broken.get(timeout=60)
    for handle in mates:
        assert set(result(handle).scores) == {1.0}


def test_a_gpu_error_no_process_can_leave_puts_the_jobs_back_restarts_the_worker_and_fails_a_repeat_offender(
        start_worker: StartWorker, redis_url: str, tmp_path: Path) -> None:
    """A device-side assert leaves the GPU unusable for the process: every later batch failed while the worker
    stayed up. Now the worker puts its jobs back and exits to be restarted; a job that was in a failing batch
    twice fails (an input that asserts would otherwise take down each worker it reached), with its batch."""
    sick = start_worker(*simulated(100, device_error_on="ASSERT"), RERANKQ_MAX_BATCH_TOKENS="64")
    waiting = [rerank.apply_async(("bread", docs(20)), queue=sick.queue) for _ in range(3)]
    time.sleep(0.3)  # their forward batches are under way
    poisoned = rerank.apply_async(("bread", ["bread ASSERT"]), queue=sick.queue)
    eventually(lambda: sick.proc.poll() is not None, 60, "the worker exits")
    assert sick.proc.returncode == DEVICE_LOST_EXIT, sick.log()[-3000:]
    assert "the GPU is in an error state this process cannot leave" in sick.log()
    assert not poisoned.ready()  # back in its queue: the first time, nothing says which job it was
    again = WorkerProcess(sick.queue, [*simulated(100, device_error_on="ASSERT")],  # its restart: it takes them
                          {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                           "RERANKQ_MAX_BATCH_TOKENS": "64"}, tmp_path / "again.log", f"again.{sick.queue}@localhost")
    try:
        with pytest.raises(DeviceLost, match="the GPU failed while scoring this job"):
            poisoned.get(timeout=60)  # the second time, it fails
        eventually(lambda: again.proc.poll() is not None, 60, "the restarted worker exits too")
    finally:
        again.stop()
    start_worker(*simulated(1), queue=sick.queue)  # a healthy one
    outcomes = [h.get(timeout=60, propagate=False) for h in waiting]
    assert all(isinstance(o, DeviceLost) or set(o["scores"]) == {1.0} for o in outcomes), outcomes
