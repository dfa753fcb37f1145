"""Celery's default task strategy (``celery.worker.strategy.default``), cut short: each received message
becomes a ``Request`` exactly as Celery makes one (protocol 1 and 2 bodies, revoked and expired jobs
skipped, ``task-received`` sent, the job counted as reserved), and is then handed over unacked, where
Celery would run it. What Celery does after that point (rate limits, ETA timers, the pool) does not apply
to jobs scored in forward batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2


def receiver(task: Any, app: Any, consumer: Any, hand_over: Callable[[Any], None]) -> Callable[..., None]:
    """The ``on_message`` callback Celery's consumer calls for each job message of ``task``."""
    Request = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, consumer.hostname,
                                 consumer.event_dispatcher, app=app)
    revoked_tasks = worker_state.revoked

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
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
        if (request.expires or request.id in revoked_tasks) and request.revoked():
            return
        worker_state.task_reserved(request)
        request.send_event("task-received", name=request.name, args=request.argsrepr,
                           kwargs=request.kwargsrepr, retries=request.request_dict.get("retries", 0),
                           root_id=request.root_id, parent_id=request.parent_id,
                           expires=request.expires and request.expires.isoformat())
        hand_over(request)

    return on_message
