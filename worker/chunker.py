"""Pure chunking logic: which jobs form the next chunk, and how its pairs split into forward batches."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Costed(Protocol):
    @property
    def tokens(self) -> int: ...


C = TypeVar("C", bound=Costed)


def take_chunk(ready: deque[C], max_tokens: int, max_jobs: int) -> list[C]:
    """Pop the longest run of jobs, in arrival order, that fits ``max_tokens`` and ``max_jobs``.

    The first job is always taken, so a job larger than the budget runs alone rather than never.
    A job that does not fit stays first in line for the next chunk (no overtaking: arrival order holds).
    """
    chunk: list[C] = []
    tokens = 0
    while ready and len(chunk) < max_jobs:
        cost = ready[0].tokens
        if chunk and tokens + cost > max_tokens:
            break
        chunk.append(ready.popleft())
        tokens += cost
    return chunk


def take_lanes(interactive: deque[C], bulk: deque[C], max_tokens: int, max_jobs: int) -> tuple[list[C], list[C]]:
    """The next chunk as (interactive jobs, bulk jobs): the waiting interactive jobs first, in arrival
    order; bulk jobs, in arrival order, fill what is left of the token budget and the job limit.

    At least one bulk job comes along in every chunk (over the budget if it must): a steady stream of
    interactive jobs slows bulk work down but never stops it, so no bulk job sits held for ever.
    """
    first = take_chunk(interactive, max_tokens, max_jobs)
    if not first:
        return first, take_chunk(bulk, max_tokens, max_jobs)
    used = sum(job.tokens for job in first)
    fill: list[C] = []
    while bulk and (not fill or (len(first) + len(fill) < max_jobs and used + bulk[0].tokens <= max_tokens)):
        used += bulk[0].tokens
        fill.append(bulk.popleft())
    return first, fill


def plan_batches(costs: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split pair indices into forward batches: longest first, each batch's padded size within budget.

    A batch pads every pair to its longest, so its cost is ``longest * count``. Sorting by length keeps
    that padding small; a single pair longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        size = max(1, max_tokens // max(1, costs[order[start]]))
        batches.append(order[start:start + size])
        start += size
    return batches
