"""Result writing: the outcomes of jobs settled together in one pipelined round trip to the result backend, and their
announcement in another once the jobs are acked.

Each job's key and value are exactly what Celery's Redis backend writes (``SETEX`` then ``PUBLISH`` on the
task's meta key), so ``AsyncResult.get()`` and Flower read them as usual. Celery's own ``store_result``
costs a read and a write per job; 60 jobs settled together would pay 120 round trips instead of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import states


@dataclass(frozen=True)
class Outcome:
    request: Any
    result: dict[str, Any] | None = None
    error: BaseException | None = None

    @property
    def state(self) -> str:
        return str(states.SUCCESS if self.error is None else states.FAILURE)


def entry(backend: Any, outcome: Outcome) -> tuple[str, bytes]:
    """The job's result key and the record Celery's backend would write there."""
    value = outcome.result if outcome.error is None else backend.prepare_exception(outcome.error)
    meta = backend._get_result_meta(result=value, state=outcome.state, traceback=None, request=outcome.request)
    meta["task_id"] = outcome.request.id
    return backend.get_key_for_task(outcome.request.id), backend.encode(meta)


def store(backend: Any, entries: Sequence[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], list[int],
                                                                       Exception | None]:
    """Write every entry with one pipelined ``SETEX`` each (retried by the backend's retry policy on
    connection loss). Returns the entries written, for ``announce``, the indices of the entries Redis
    refused (a Redis filling up takes some writes of a pipeline and refuses the rest), and the first refusal."""
    def write() -> list[Any]:
        with backend.client.pipeline(transaction=False) as pipe:
            for key, value in entries:
                pipe.setex(key, backend.expires, value)
            return list(pipe.execute(raise_on_error=False))

    replies = backend.ensure(write, ()) if entries else []
    refused = [i for i, reply in enumerate(replies) if isinstance(reply, Exception)]
    written = [entry for i, entry in enumerate(entries) if i not in set(refused)]
    return written, refused, replies[refused[0]] if refused else None


def announce(backend: Any, entries: Sequence[tuple[str, bytes]]) -> None:
    """``PUBLISH`` each written result to its waiters, in one pipeline. Called after the jobs are acked, so
    a producer that sends a new job for each result never has more jobs in Redis than it has in flight.
    A lost announcement costs only latency: waiters also read the keys."""
    def publish() -> None:
        with backend.client.pipeline(transaction=False) as pipe:
            for key, value in entries:
                pipe.publish(key, value)
            pipe.execute()

    if entries:
        backend.ensure(publish, ())
