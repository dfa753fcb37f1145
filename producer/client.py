"""``rerank()`` and ``await arerank()``: send one job and wait for its ``Result``.

Both give the job a ``deadline`` of now + ``timeout`` (unless you give one), so a job whose caller has
given up is skipped by the workers instead of scored. Both raise ``RerankTimeout`` when no result came in
time, and re-raise the job's own error (``BadJob``, ``DeadlineExceeded``, ``RankerFailed``) otherwise.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout

from producer.waiting import AsyncWaiter
from tasks.errors import RerankTimeout
from tasks.lanes import INTERACTIVE
from tasks.records import Result
from tasks.rerank import rerank as rerank_task

DEFAULT_TIMEOUT_S = 30.0

_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncWaiter] = weakref.WeakKeyDictionary()


def rerank(query: str, docs: Sequence[str], top_k: int | None = None, deadline: float | None = None,
           timeout: float = DEFAULT_TIMEOUT_S, queue: str | None = None, lane: str = INTERACTIVE) -> Result:
    """Score ``docs`` against ``query``; blocks up to ``timeout`` seconds. ``lane="bulk"`` sends it behind
    interactive traffic (never shed)."""
    handle = _send(str(uuid.uuid4()), query, docs, top_k, deadline, timeout, queue, lane)
    try:
        return Result.from_dict(handle.get(timeout=timeout, propagate=True))
    except CeleryTimeout:
        raise _timeout(handle.id, timeout, queue) from None


async def arerank(query: str, docs: Sequence[str], top_k: int | None = None, deadline: float | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S, queue: str | None = None, lane: str = INTERACTIVE) -> Result:
    """Like ``rerank``, awaited: one async Redis connection per event loop waits for every pending job."""
    loop = asyncio.get_running_loop()
    waiter = _waiters.get(loop)
    if waiter is None:
        waiter = _waiters[loop] = AsyncWaiter(rerank_task.backend)
    task_id = str(uuid.uuid4())
    future = await waiter.expect(task_id)
    try:
        handle = _send(task_id, query, docs, top_k, deadline, timeout, queue, lane)
        if handle.ready():  # passthrough: answered without queueing
            return Result.from_dict(handle.get(propagate=True))
        outcome = await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise _timeout(task_id, timeout, queue) from None
    finally:
        await waiter.forget(task_id)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _send(task_id: str, query: str, docs: Sequence[str], top_k: int | None, deadline: float | None,
          timeout: float, queue: str | None, lane: str) -> Any:
    deadline = deadline if deadline is not None else time.time() + timeout
    options: dict[str, Any] = {"task_id": task_id, "lane": lane}
    if queue:
        options["queue"] = queue
    return rerank_task.apply_async((query, docs), {"top_k": top_k, "deadline": deadline}, **options)


def _timeout(task_id: str, timeout: float, queue: str | None) -> RerankTimeout:
    return RerankTimeout(
        f"no result for job {task_id} within {timeout:g}s{f' on queue {queue}' if queue else ''}: are workers "
        "running and keeping up? `rerankq status` shows queues, backlogs and live workers")
