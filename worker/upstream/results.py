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
from celery.backends.base import Backend


@dataclass(frozen=True)
class Outcome:
    request: Any
    result: dict[str, Any] | None = None
    error: BaseException | None = None

    @property
    def state(self) -> str:
        return str(states.SUCCESS if self.error is None else states.FAILURE)


@dataclass(frozen=True)
class Stamp:
    """What the records of jobs settled together share, each read once (for every job, the clock cost 6 µs and the
    configuration 4 µs, of about 650 per job when the model costs nothing): when (Celery's ``date_done``), and
    whether Celery's own ``_get_result_meta`` builds the records: with ``result_extended`` on, or a result backend
    that overrides it."""

    date_done: str
    celerys: bool

    @classmethod
    def now(cls, backend: Any) -> Stamp:
        overridden = type(backend)._get_result_meta is not Backend._get_result_meta
        return cls(backend.app.now().isoformat(), overridden or bool(backend.app.conf.result_extended))


def entry(backend: Any, outcome: Outcome, stamp: Stamp) -> tuple[str, bytes]:
    """The job's result key and the record Celery's backend would write there."""
    value = outcome.result if outcome.error is None else backend.prepare_exception(outcome.error)
    return backend.get_key_for_task(outcome.request.id), backend.encode(record(backend, outcome, value, stamp))


def record(backend: Any, outcome: Outcome, value: Any, stamp: Stamp) -> dict[str, Any]:
    """What Celery's ``Backend._get_result_meta`` builds for a finished task, plus its id. Copied (surface.py
    checks Celery's is unchanged): Celery's reads the clock, the time zone and the configuration again for every
    job (15 µs a record; with ``asdict``, 45 of a job's ~650 when the model costs nothing: BENCHMARKS.md). With
    ``result_extended`` on, Celery's own builds it."""
    request = outcome.request
    if stamp.celerys:
        meta: dict[str, Any] = backend._get_result_meta(result=value, state=outcome.state, traceback=None,
                                                        request=request)
        meta["date_done"] = stamp.date_done
    else:
        meta = {"status": outcome.state, "result": value, "traceback": None,
                "children": backend.current_task_children(request), "date_done": stamp.date_done}
        if getattr(request, "group", None):
            meta["group_id"] = request.group
        if getattr(request, "parent_id", None):
            meta["parent_id"] = request.parent_id
    meta["task_id"] = request.id
    return meta


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
    refused_at = set(refused)
    written = [entry for i, entry in enumerate(entries) if i not in refused_at]
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
