"""Chunk formation and forward-batch planning: pure logic."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.chunker import plan_batches, take_chunk, take_lanes


@dataclass
class J:
    tokens: int


def test_a_chunk_takes_jobs_in_order_until_the_budget_is_full() -> None:
    ready = deque([J(40), J(30), J(50), J(10)])
    assert [j.tokens for j in take_chunk(ready, max_tokens=100, max_jobs=10)] == [40, 30]
    assert [j.tokens for j in ready] == [50, 10]


def test_a_job_larger_than_the_budget_runs_alone() -> None:
    ready = deque([J(500), J(10)])
    assert [j.tokens for j in take_chunk(ready, max_tokens=100, max_jobs=10)] == [500]
    assert [j.tokens for j in take_chunk(ready, max_tokens=100, max_jobs=10)] == [10]


def test_a_chunk_takes_the_waiting_interactive_jobs_first_and_fills_the_rest_with_bulk_jobs() -> None:
    interactive, bulk = deque([J(30), J(20)]), deque([J(40), J(20), J(5)])
    first, fill = take_lanes(interactive, bulk, max_tokens=100, max_jobs=10)
    assert ([j.tokens for j in first], [j.tokens for j in fill]) == ([30, 20], [40])  # arrival order: 5 waits
    assert not interactive and [j.tokens for j in bulk] == [20, 5]


def test_bulk_jobs_fill_within_the_job_limit_and_a_lone_bulk_run_takes_whole_chunks() -> None:
    interactive, bulk = deque([J(1)]), deque(J(1) for _ in range(9))
    assert [len(part) for part in take_lanes(interactive, bulk, max_tokens=100, max_jobs=4)] == [1, 3]
    assert [len(part) for part in take_lanes(interactive, bulk, max_tokens=100, max_jobs=4)] == [0, 4]


def test_interactive_jobs_that_fill_the_budget_still_take_one_bulk_job_so_bulk_work_never_stops() -> None:
    interactive, bulk = deque([J(150), J(10)]), deque([J(30), J(1)])
    assert [[j.tokens for j in part] for part in take_lanes(interactive, bulk, 100, 10)] == [[150], [30]]
    interactive, bulk = deque(J(1) for _ in range(8)), deque([J(1), J(1)])
    assert [len(part) for part in take_lanes(interactive, bulk, max_tokens=100, max_jobs=4)] == [4, 1]


def test_a_chunk_holds_at_most_max_jobs() -> None:
    ready = deque(J(0) for _ in range(7))
    assert len(take_chunk(ready, max_tokens=100, max_jobs=3)) == 3
    assert len(ready) == 4


def test_batches_cover_every_pair_once_longest_first_within_the_padded_budget() -> None:
    costs = [5, 80, 20, 20, 60, 7, 300, 1]
    batches = plan_batches(costs, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(costs)))
    flat = [costs[i] for b in batches for i in b]
    assert flat == sorted(costs, reverse=True)
    for batch in batches:
        padded = max(costs[i] for i in batch) * len(batch)
        assert padded <= 100 or len(batch) == 1


def test_no_pairs_no_batches() -> None:
    assert plan_batches([], 100) == []
