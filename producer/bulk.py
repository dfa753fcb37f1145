"""``submit_many``: rerank an iterable of jobs with a bounded number in flight, results as they complete."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterable, Mapping
from typing import Any

from rerankq.producer.waiting import Outcome, Waiter
from rerankq.tasks.errors import UnknownModel
from rerankq.tasks.lanes import BULK, queue_for
from rerankq.tasks.rerank import rerank as rerank_task

DEFAULT_MAX_IN_FLIGHT = 256
#: A bulk run rides out a Redis restart: keep retrying a send for about a minute (Celery's default gives
#: up within a second).
PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


def submit_many(jobs: Iterable[Mapping[str, Any]], max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                queue: str | None = None, lane: str = BULK, model: str | None = None,
                ) -> Generator[tuple[Any, Outcome], None, None]:
    """Send each job ``{"id", "query", "docs"[, "top_k", "long_docs", "model", "instruction"]}`` and yield
    ``(id, Result or exception)`` as results complete, never with more than ``max_in_flight`` jobs sent and
    unanswered.

    Jobs go to their model's queue (a job's own ``model``, else ``model``, else the default model), or all to
    ``queue`` if given, in its bulk lane unless ``lane="interactive"``: workers serve them with whatever
    interactive traffic leaves, and an offline run is never shed to the fast ranker or answered with
    passthrough. An unknown ``model`` raises ``UnknownModel`` before any job is sent; a job naming an unknown
    one gets it as its outcome. Stopping the iteration leaves the jobs in flight to finish unread.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    from rerankq.celeryconfig import settings

    served = settings.served
    default = served.resolve(model)
    waiter = Waiter(rerank_task.backend)
    ids: dict[str, Any] = {}
    pending = iter(jobs)
    exhausted = False
    try:
        while True:
            while not exhausted and len(waiter) < max_in_flight:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                    break
                name = job.get("model") or model  # the line's, else the run's; None: the default
                try:
                    named = served.resolve(name) if name is not None else default
                except UnknownModel as exc:
                    yield job.get("id"), exc
                    continue
                task_id = str(uuid.uuid4())
                ids[task_id] = job.get("id")
                waiter.expect(task_id)
                # A malformed job fails on its own, with the worker's BadJob, like any other.
                options = {k: job[k] for k in ("long_docs", "instruction") if job.get(k) is not None}
                if queue is None and name is not None:  # named, it goes along: checked by the worker (Misrouted)
                    options["model"] = name
                rerank_task.apply_async((job.get("query"), job.get("docs")), {"top_k": job.get("top_k"), **options},
                                        task_id=task_id, queue=queue_for(queue or named.queue, lane),
                                        retry_policy=PUBLISH_RETRY)
            if not len(waiter):
                return
            for task_id, outcome in waiter.arrived(timeout=1.0):
                yield ids.pop(task_id), outcome
    finally:
        waiter.close()
