"""The routing rules, as pure logic: hysteresis marks, estimated waits, the passthrough result."""

from __future__ import annotations

import pytest

from rerankq.tasks import BadJob
from rerankq.tasks.router import QueueLoad, passthrough_result
from rerankq.worker.marks import Marks

MARKS = Marks(high_wait_s=2.0, low_wait_s=0.5, cold_jobs=64)


def load(wait_s: float | None = None, backlog: int = 0, workers: int = 1) -> QueueLoad:
    """A queue whose live workers serve 100 pairs/s of 10-pair jobs (10 jobs/s)."""
    if wait_s is not None:
        backlog = round(wait_s * 10)
    return QueueLoad("q", waiting=backlog, held=0, workers=workers, pairs_per_s=100.0, pairs_per_job=10.0)


def follow(marks: Marks, loads: list[QueueLoad]) -> list[bool]:
    overloaded, states = False, []
    for queue_load in loads:
        overloaded = marks.overloaded(overloaded, queue_load)
        states.append(overloaded)
    return states


def test_estimated_wait_is_backlog_pairs_over_throughput() -> None:
    assert QueueLoad("q", 30, 20, 2, pairs_per_s=200.0, pairs_per_job=8.0).wait_s == pytest.approx(2.0)


def test_wait_is_infinite_with_no_live_worker_and_unknown_before_any_chunk() -> None:
    assert load(backlog=0, workers=0).wait_s == float("inf")
    assert QueueLoad("q", 5, 0, 1, pairs_per_s=None, pairs_per_job=None).wait_s is None


def test_sheds_above_the_high_mark_and_returns_only_at_or_below_the_low_mark() -> None:
    waits = [0.1, 1.9, 2.1, 1.5, 0.6, 0.5, 0.4]
    assert follow(MARKS, [load(w) for w in waits]) == [False, False, True, True, True, False, False]


def test_a_wait_oscillating_between_the_marks_does_not_flap_either_way() -> None:
    between = [load(w) for w in (0.8, 1.9, 0.7, 1.8, 0.6, 1.9) * 3]
    assert not any(follow(MARKS, between))
    assert all(follow(MARKS, [load(2.5), *between]))


def test_job_count_marks_shed_on_backlog_even_while_the_wait_is_unknown() -> None:
    marks = Marks(high_wait_s=2.0, low_wait_s=0.5, cold_jobs=1000, high_jobs=100, low_jobs=20)
    unknown = [QueueLoad("q", n, 0, 1, None, None) for n in (50, 101, 60, 21, 20)]
    assert follow(marks, unknown) == [False, True, True, True, False]


def test_a_queue_of_unknown_speed_takes_one_chunk_per_live_worker() -> None:
    def cold(backlog: int, workers: int) -> QueueLoad:
        return QueueLoad("q", backlog, 0, workers, pairs_per_s=None, pairs_per_job=None)

    loads = [cold(64, 1), cold(65, 1), cold(65, 1), cold(64, 1), cold(129, 2), cold(128, 2), load(1.9)]
    assert follow(MARKS, loads) == [False, True, True, False, True, False, False]


def test_a_queue_without_live_workers_is_over_its_mark() -> None:
    assert follow(MARKS, [load(workers=0), load(workers=0), load(0.1)]) == [True, True, False]


def test_passthrough_keeps_retrieval_order_with_decreasing_scores() -> None:
    result = passthrough_result(("q", ["a", "b", "c", "d"]), {"top_k": 2}, max_docs=10)
    assert result.ranker == "passthrough"
    assert result.scores == sorted(result.scores, reverse=True) and len(set(result.scores)) == 4
    assert result.top == [0, 1]
    assert passthrough_result(("q", []), {}, max_docs=10).scores == []


def test_passthrough_still_refuses_a_malformed_job() -> None:
    with pytest.raises(BadJob, match="docs\\[1\\] must be a string"):
        passthrough_result(("q", ["a", 3]), {}, max_docs=10)
