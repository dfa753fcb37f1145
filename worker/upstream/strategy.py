"""Celery's default task strategy (``celery.worker.strategy.default``), cut short: each received message
becomes a ``Request`` exactly as Celery makes one (protocol 1 and 2 bodies, revoked and expired jobs
skipped, ``task-received`` sent, the job counted as reserved), and is then handed over unacked, where
Celery would run it. What Celery does after that point (rate limits, ETA timers, the pool) does not apply
to jobs scored in forward batches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from rerankq.worker import metrics
from rerankq.worker.dropped import NOT_A_JOB, dropped

logger = logging.getLogger(__name__)


def receiver(task: Any, app: Any, consumer: Any, hand_over: Callable[[Any], None]) -> Callable[..., None]:
    """The ``on_message`` callback Celery's consumer calls for each job message of ``task``."""
    Request = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, consumer.hostname,
                                 consumer.event_dispatcher, app=app)
    revoked_tasks = worker_state.revoked

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
        try:
            if body is None and "args" not in message.payload:
                body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
            elif "args" in message.payload:
                body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, utc = proto1_to_proto2(message, body)
            request = Request(message, on_ack=ack, on_reject=reject, app=app, hostname=consumer.hostname,
                              eventer=consumer.event_dispatcher, task=task,
                              connection_errors=consumer.connection_errors, body=body, headers=headers,
                              decoded=decoded, utc=utc)
            _check(request)
        except Exception as exc:  # Celery would end the worker, and the message would come back to end the next
            _drop(app, message, exc)
            return
        if (request.expires or request.id in revoked_tasks) and request.revoked():
            if request.id in revoked_tasks:
                metrics.CANCELLED.inc()
            return
        worker_state.task_reserved(request)
        request.send_event("task-received", name=request.name, args=request.argsrepr,
                           kwargs=request.kwargsrepr, retries=request.request_dict.get("retries", 0),
                           root_id=request.root_id, parent_id=request.parent_id,
                           expires=request.expires and request.expires.isoformat())
        hand_over(request)

    return on_message


def _check(request: Any) -> None:
    """A request a result can be written for: a non-empty string id. (A body Celery could unpack into args,
    kwargs and embed is one already; whether its args make a rerank job is the preparer's to say, in that
    result, so that its caller hears of it.)"""
    if not isinstance(request.id, str) or not request.id.strip():
        raise ValueError(f"task id {request.id!r}: not a string")


def _drop(app: Any, message: Any, exc: Exception) -> None:
    """Removed from Redis as an ack would; logged and counted under its queue if it is one this worker serves
    (the routing key is the message's own say, so any other goes under one label). Never raises: a drop that
    failed would end the worker as the message did."""
    queue = "other"
    try:
        routing_key = (getattr(message, "delivery_info", None) or {}).get("routing_key")
        if isinstance(routing_key, str) and routing_key in (app.amqp.queues.consume_from or app.amqp.queues):
            queue = routing_key
        dropped(queue, NOT_A_JOB, repr(exc), getattr(message, "body", message))
        message.ack()
    except Exception:
        logger.warning("could not drop a message of %s cleanly", queue, exc_info=True)
