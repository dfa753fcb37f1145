"""The ``rerank`` task: the one name producers call and workers serve."""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from tasks.app import app
from tasks.errors import RerankError

TASK_NAME = "rerankq.rerank"
#: Message header with the producer's send time, for the result's queue wait.
SENT_AT_HEADER = "rerankq_sent_at"


class RerankTask(Task):
    """A Celery task whose messages are consumed in chunks instead of run one by one.

    The worker-side ``Strategy`` buffers each received job into the chunk consumer, which scores many
    jobs in one batched inference and then stores, announces and acks each job on its own: every job
    keeps its id, its ``AsyncResult`` and its task events.
    """

    Strategy = "worker.consumer:chunk_strategy"
    # Arguments are validated by the worker, so a malformed call fails its own job (raised by .get()).
    typing = False

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(SENT_AT_HEADER, time.time())
        return super().apply_async(args, kwargs, headers=headers, **options)


@app.task(base=RerankTask, name=TASK_NAME)
def rerank(query: str, docs: list[str], top_k: int | None = None, deadline: float | None = None) -> Any:
    """Score ``docs`` against ``query``; ``.get()`` returns a ``Result`` dict (scores in input order)."""
    raise RerankError(
        "rerank jobs are scored in chunks by `rerankq worker`; they cannot run eagerly or in a "
        "worker started without rerankq's chunk consumer")
