"""Chunk formation and forward-batch planning: pure logic."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.chunker import plan_batches, take_chunk


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
