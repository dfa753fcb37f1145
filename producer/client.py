"""``rerank()`` and ``await arerank()``: send one job and wait for its ``Result``.

Both give the job a ``deadline`` of now + ``timeout`` (unless you give one), so a job whose caller has
given up is skipped by the workers instead of scored; a cancelled ``arerank`` revokes its job at once. Both
raise ``RerankTimeout`` when no result came in time, and re-raise the job's own error (``BadJob``,
``DeadlineExceeded``, ``RankerFailed``) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import EagerResult

from rerankq.producer.revoker import Revoker
from rerankq.producer.waiting import AsyncWaiter
from rerankq.tasks import clock
from rerankq.tasks.errors import RerankTimeout
from rerankq.tasks.lanes import INTERACTIVE
from rerankq.tasks.records import Result
from rerankq.tasks.rerank import rerank as rerank_task

DEFAULT_TIMEOUT_S = 30.0

#: The threads ``arerank`` sends from, shared by every event loop: Celery keeps a result backend (with a Redis
#: connection) per thread, and a loop's own executor, new with each ``asyncio.run``, left one more each time.
_senders = ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="rerankq-send")

_revoker = Revoker(rerank_task.app)

#: Each event loop's waiter, and the async generator that closes it as the loop shuts down (kept here: the loop
#: holds its async generators weakly).
_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[AsyncWaiter, AsyncGenerator[None, None]]] = (
    weakref.WeakKeyDictionary())


def rerank(query: str, docs: Sequence[str], top_k: int | None = None, deadline: float | None = None,
           timeout: float = DEFAULT_TIMEOUT_S, queue: str | None = None, lane: str = INTERACTIVE,
           raw_scores: bool = False, long_docs: str | None = None, model: str | None = None,
           instruction: str | None = None) -> Result:
    """Score ``docs`` against ``query``; blocks up to ``timeout`` seconds. ``model`` names a served model (the
    default one if None; ``UnknownModel`` before anything is sent for one not served); ``instruction`` is what an
    LLM reranker judges by (None: the model's default; a cross-encoder refuses one); ``lane="bulk"`` sends it
    behind interactive traffic (never shed); ``raw_scores`` asks for the model's logits instead of its scores;
    ``long_docs`` ("truncate", "truncate-left", "split", "refuse") overrides ``RERANKQ_LONG_DOCS``."""
    job = _job(top_k, deadline, timeout, raw_scores, long_docs, model, instruction)
    handle = _send(str(uuid.uuid4()), query, docs, job, queue, lane)
    try:
        # Celery refuses a wait inside a task of any app (the caller's own Celery worker, say), against a
        # deadlock on its own pool. A rerank job runs on rerankq's workers, never in the caller's pool. (Per
        # call: celery's allow_join_result() flips a flag of the whole process, racing in a threaded pool.)
        return Result.from_dict(handle.get(timeout=timeout, propagate=True, disable_sync_subtasks=False))
    except CeleryTimeout:
        raise _timeout(handle.id, timeout, queue) from None


async def arerank(query: str, docs: Sequence[str], top_k: int | None = None, deadline: float | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S, queue: str | None = None, lane: str = INTERACTIVE,
                  raw_scores: bool = False, long_docs: str | None = None, model: str | None = None,
                  instruction: str | None = None) -> Result:
    """Like ``rerank``, awaited: one async Redis connection per event loop waits for every pending job.

    Nothing blocks the event loop: the send (a synchronous publish, with its retries, and the route read)
    runs in the loop's executor, and ``timeout`` covers the whole call, so a hung Redis ends it with
    ``RerankTimeout`` on time while the loop serves everything else."""
    loop = asyncio.get_running_loop()
    waiter = await _waiter(loop)
    task_id = str(uuid.uuid4())
    # The deadline from the call, not the send.
    job = _job(top_k, deadline, timeout, raw_scores, long_docs, model, instruction)
    send = functools.partial(_send, task_id, query, docs, job, queue, lane)
    try:
        outcome = await asyncio.wait_for(_sent_and_awaited(loop, waiter, task_id, send), timeout)
    except asyncio.TimeoutError:
        raise _timeout(task_id, timeout, queue) from None
    except asyncio.CancelledError:
        cancel(task_id)
        raise
    finally:
        waiter.forget(task_id)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def cancel(task_id: str) -> None:
    """Revoke a job whose caller is gone (an ``arerank`` cancelled, an HTTP client that disconnected), without
    blocking the event loop (producer/revoker.py). If the job's own send is still waiting for a sender thread, the
    revoke reaches the workers first and the job is dropped when it arrives."""
    _revoker.revoke(task_id)


async def _waiter(loop: asyncio.AbstractEventLoop) -> AsyncWaiter:
    """The loop's waiter, made on its first ``arerank``."""
    if loop in _waiters:
        return _waiters[loop][0]
    waiter = AsyncWaiter(rerank_task.backend)
    closer = _closed_with(waiter)
    _waiters[loop] = (waiter, closer)
    await closer.__anext__()  # started: from now on the loop knows it
    return waiter


async def _closed_with(waiter: AsyncWaiter) -> AsyncGenerator[None, None]:
    """Closes ``waiter``'s connections as its loop shuts down: ``asyncio.run`` (and uvicorn) close every open
    async generator (``shutdown_asyncgens``) while the loop still runs. Left to the garbage collector, each
    ``asyncio.run(arerank(...))`` left two connections open until a collection found them."""
    try:
        yield
    finally:
        _waiters.pop(asyncio.get_running_loop(), None)
        with contextlib.suppress(Exception):  # Redis gone meanwhile: nothing left to close politely
            await waiter.close()


async def _sent_and_awaited(loop: asyncio.AbstractEventLoop, waiter: AsyncWaiter, task_id: str,
                            send: Callable[[], Any]) -> Result | BaseException:
    future = await waiter.expect(task_id)  # subscribed before the send: no result can slip past
    # In the caller's context (its trace, for one), which the executor's thread would not otherwise have.
    handle = await loop.run_in_executor(_senders, contextvars.copy_context().run, send)
    if isinstance(handle, EagerResult):  # passthrough: answered without queueing
        return Result.from_dict(handle.get(propagate=True))
    return await future


def _job(top_k: int | None, deadline: float | None, timeout: float, raw_scores: bool,
         long_docs: str | None, model: str | None, instruction: str | None) -> dict[str, Any]:
    """The job's keyword arguments. Options left at their default are not sent: such a job is one any
    earlier worker serves too. With no deadline given, it is ``timeout`` from now, on Redis's clock: the
    send fills it in once the clock is synced (``_timeout_s``, ``_called`` say from when)."""
    job: dict[str, Any] = {"top_k": top_k, "deadline": deadline}
    if deadline is None:
        job.update(_timeout_s=timeout, _called=time.monotonic())
    if raw_scores:
        job["raw_scores"] = True
    if long_docs is not None:
        job["long_docs"] = long_docs
    if model is not None:  # picks the queue as it is sent (RerankTask.apply_async), not sent itself
        job["model"] = model
    if instruction is not None:
        job["instruction"] = instruction
    return job


def _send(task_id: str, query: str, docs: Sequence[str], job: dict[str, Any], queue: str | None, lane: str) -> Any:
    rerank_task.sync_clock()  # off the event loop for arerank: it may wait on Redis
    if "_timeout_s" in job:
        job = dict(job)
        timeout, called = job.pop("_timeout_s"), job.pop("_called")
        job["deadline"] = clock.now() + timeout - (time.monotonic() - called)
    options: dict[str, Any] = {"task_id": task_id, "lane": lane}
    if queue:
        options["queue"] = queue
    return rerank_task.apply_async((query, docs), job, **options)


def _timeout(task_id: str, timeout: float, queue: str | None) -> RerankTimeout:
    return RerankTimeout(
        f"no result for job {task_id} within {timeout:g}s{f' on queue {queue}' if queue else ''}: are workers "
        "running and keeping up? `rerankq status` shows queues, backlogs and live workers")
