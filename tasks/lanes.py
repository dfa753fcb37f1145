"""Lanes: every ranker queue has an interactive lane and a bulk lane, two Redis lists side by side.

A queue's interactive lane is the queue itself (``rerank.gpu``), its bulk lane the queue with
``RERANKQ_BULK_SUFFIX`` (``rerank.gpu.bulk``). Web traffic (``rerank()``, ``arerank()``, ``rerank.delay``)
goes to the interactive lane, offline runs (``rerankq submit``, ``submit_many``) to the bulk lane. A worker
serves both lanes of its queue: it receives interactive jobs first, holds bulk jobs only up to a cap so
that there is always room to receive interactive ones, and scores interactive pairs ahead of bulk ones
(worker/upstream/transport.py, worker/consumer.py). The watchdog judges the interactive lane only: bulk jobs wait
their turn, and are never shed or passed through.
"""

from __future__ import annotations

from collections.abc import Iterable

INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)


def _suffix() -> str:
    from rerankq.celeryconfig import settings

    return settings.bulk_suffix


def check(lane: str) -> str:
    """``lane`` if it is one; a ``ValueError`` that names both otherwise."""
    if lane not in LANES:
        raise ValueError(f"lane must be {INTERACTIVE!r} or {BULK!r}, got {lane!r}")
    return lane


def lane_of(queue: str, suffix: str | None = None) -> str:
    """Which lane ``queue`` (a queue name or a routing key) is."""
    return BULK if queue.endswith(suffix or _suffix()) else INTERACTIVE


def base_of(queue: str, suffix: str | None = None) -> str:
    """The interactive lane of the queue ``queue`` is a lane of."""
    suffix = suffix or _suffix()
    return queue[:-len(suffix)] if queue.endswith(suffix) else queue


def queue_for(queue: str, lane: str, suffix: str | None = None) -> str:
    """The list of ``queue``'s ``lane``: the queue itself, or its bulk lane."""
    base = base_of(queue, suffix)
    return base + (suffix or _suffix()) if check(lane) == BULK else base


def both(queues: Iterable[str], suffix: str | None = None) -> list[str]:
    """The lanes a worker serves for ``queues``: the interactive lanes first, then the bulk ones (the order
    it receives in). A bulk lane named alone is served alone."""
    suffix = suffix or _suffix()
    interactive = [q for q in dict.fromkeys(queues) if lane_of(q, suffix) == INTERACTIVE]
    bulk = [q for q in dict.fromkeys(queues) if lane_of(q, suffix) == BULK]
    return interactive + list(dict.fromkeys([*(q + suffix for q in interactive), *bulk]))
