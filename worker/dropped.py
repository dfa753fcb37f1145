"""Items on a queue that cannot become a rerank job: not a kombu message (not JSON, no delivery tag, a body
that does not decode), or a message that is not a rerank request (no string id, a body that is not
``[args, kwargs, embed]``). Anyone who can write to Redis can put one there, and a bug in another producer
can too. Such an item is dropped: removed from Redis as an ack would, logged once with its queue and why,
and counted (``rerankq_messages_dropped_total``), never put back and never fatal, so that the worker goes on
to the next job. It has no id to answer, or no request to answer, so no result is written."""

from __future__ import annotations

import logging

from rerankq.worker import metrics

logger = logging.getLogger(__name__)

#: The reasons, as the metric's ``reason`` label has them.
NOT_A_MESSAGE = "not a message"
NOT_A_JOB = "not a rerank job"

#: Characters of a dropped item the log shows, at most.
SHOWN = 200


def dropped(queue: str, reason: str, why: object, item: object) -> None:
    metrics.DROPPED.labels(queue=queue, reason=reason).inc()
    shown = item[:SHOWN] if isinstance(item, bytes | str) else item  # cut before str(): an item may be large
    logger.error("dropped an item of queue %s: %s (%s): %r", queue, reason, why, str(shown)[:SHOWN])
