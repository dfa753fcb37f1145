"""Patches of kombu and Celery bugs that would otherwise take a worker down or lose a job; each names its
symptom (the index: worker/upstream/__init__.py)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from rerankq.tasks import memory

logger = logging.getLogger(__name__)


def survive_redis_outage() -> None:
    """kombu 5.x: a Redis restart can end a worker with "Unrecoverable error", or lose the job in transit.

    When Redis goes away, Celery closes the connection; the Redis channel's close then tries to put its
    unacked jobs back on a connection already released (its transport's ``client`` is None), and raises
    ``AttributeError: 'NoneType' object has no attribute 'hostname'`` making a pool (celery/kombu#582).
    Celery treats that as unrecoverable and the worker exits. Skip the restore in that state instead:
    the jobs stay in kombu's unacked hash, where the watchdog reclaims them (worker/reclaim.py)
    or the visibility timeout returns them."""
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "rerankq_patched", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and getattr(self.channel.connection, "client", None) is None:  # released: no pool
            logger.warning("could not put %d unacked job(s) back while the connection closed; they return "
                           "once reclaimed", len(self._delivered))
            self._delivered.clear()
            return None
        return original(self, client)

    original_ack, original_reject = kombu_redis.QoS.ack, kombu_redis.QoS.reject

    def ack(self: Any, delivery_tag: str) -> None:
        """The consumer acks a job received before a reconnect on its old, closed channel: the chunk
        consumer has already removed it from Redis (worker/settle.py ``ack_all``), so forget it instead of raising."""
        if self.channel.closed:
            self._delivered.pop(delivery_tag, None)
            return
        original_ack(self, delivery_tag)

    def reject(self: Any, delivery_tag: str, requeue: bool = False) -> None:
        if self.channel.closed:  # left in the unacked hash: reclaimed, or back after the visibility timeout
            self._delivered.pop(delivery_tag, None)
            return
        original_reject(self, delivery_tag, requeue)

    original_append = kombu_redis.QoS.append

    def append(self: Any, message: Any, delivery_tag: str) -> None:
        """A job popped off its queue just as Redis went away cannot be recorded as unacked; kombu then drops
        it, and it is lost. Serve it anyway: its result is written once Redis is back. (Only a worker of
        several queues pops so; one of a single queue moves the job in flight, worker/upstream/transport.py.)"""
        try:
            original_append(self, message, delivery_tag)
        except self.channel.connection_errors as exc:
            logger.warning("job %s received as Redis went away (%r): serving it unrecorded",
                           (message.headers or {}).get("id"), exc)
            virtual.QoS.append(self, message, delivery_tag)

    original_visible = kombu_redis.QoS.restore_visible

    def restore_visible(self: Any, *args: Any, **kwargs: Any) -> Any:
        """A full Redis refuses the scan's mutex (``SET NX``): kombu 5.7 calls the scan as the consumer
        connects, and the worker exited "Unrecoverable error: OutOfMemoryError" (issue: every restart the same).
        Skip that scan; the next one runs once Redis has room, and the watchdog reclaims meanwhile."""
        try:
            return original_visible(self, *args, **kwargs)
        except redis.ResponseError as exc:
            if not memory.is_full(exc):
                raise
            logger.warning("Redis is full: the scan for jobs past their visibility timeout waits for room")
            return None

    restore_unacked.rerankq_patched = True  # type: ignore[attr-defined]
    patches = {"restore_unacked": restore_unacked, "ack": ack, "reject": reject, "append": append,
               "restore_visible": restore_visible}
    for name, patched in patches.items():
        setattr(kombu_redis.QoS, name, patched)


def route_task_events(dispatcher: Any, outbox: deque[Any], on_sent: Callable[[], None]) -> None:
    """celery 5.4-5.6 ``EventDispatcher``: a buffered event sent from another thread while the event loop
    flushes can be lost (5.7.0 clears only what it published; the outbox stays for the older versions the
    project allows, and for the events of jobs received before a reconnect, which no version carries over).

    ``flush`` publishes a group's buffer and then empties it (``events[:] = []``) under the dispatcher's
    mutex, but ``send`` appends to that buffer without it: an event appended in between is cleared unsent
    (``tests/test_compat.py`` makes it happen). The chunk consumer sends ``task-started`` and
    ``task-succeeded`` from its runner and settler threads, so Flower saw jobs stuck at "started". The
    dispatcher's ``task`` events go to ``outbox`` instead (a deque: appends are thread-safe), and the event
    loop alone hands them to the dispatcher and flushes (``flush_task_events``). Taking the mutex to append
    instead would block the runner whenever a flush waits on Redis, and ``close()`` releases that mutex
    under whoever holds it. Sharing one ``outbox`` across reconnects also publishes the events of jobs
    received on the old connection, which celery's new dispatcher does not carry over."""
    from celery.events.event import Event, group_from
    from celery.utils.time import utcoffset

    original_send = dispatcher.send

    def send(type: str, **fields: Any) -> Any:
        if not (dispatcher.enabled and group_from(type) == "task" and "task" in dispatcher.buffer_group):
            return original_send(type, **fields)
        outbox.append(Event(type, hostname=dispatcher.hostname, utcoffset=utcoffset(), pid=dispatcher.pid,
                            clock=dispatcher.clock.forward(), **fields))
        on_sent()
        return None

    dispatcher.send = send


#: kombu's retry policy for the worker's heartbeats: one try (a hung Redis costs it one socket timeout; a retry
#: would add a reconnect's and a second publish's).
HEARTBEAT_RETRY = {"max_retries": 0}


def bound_heartbeat_retries(dispatcher: Any) -> None:
    """Celery's ``Heart`` publishes each heartbeat with ``retry=True`` and no policy, which kombu reads as
    retrying for ever (``Connection.ensure``, ``max_retries=None``): while Redis hung (connections that neither
    answer nor fail) the worker's event loop stayed inside one heartbeat, a timeout per try, and did nothing
    else until Redis answered. Bounded, a heartbeat that cannot go is skipped (said once until one goes again);
    the next is due an interval later, and the receive's own timeouts reconnect."""
    from kombu.exceptions import OperationalError

    original_send = dispatcher.send
    failing = False

    def send(type: str, **fields: Any) -> Any:
        nonlocal failing
        if not (type == "worker-heartbeat" and fields.get("retry") and not fields.get("retry_policy")):
            return original_send(type, **fields)
        try:
            sent = original_send(type, **{**fields, "retry_policy": HEARTBEAT_RETRY})
        except (OperationalError, *dispatcher.connection.connection_errors) as exc:
            if not failing:
                logger.warning("could not send a heartbeat (%r): skipped, the next is due in %s s", exc,
                               fields.get("freq"))
            failing = True
            return None
        failing = False
        return sent

    dispatcher.send = send


def flush_task_events(dispatcher: Any, outbox: deque[Any]) -> None:
    """On the event loop: publish every task event in ``outbox`` with ``dispatcher``, in one message."""
    events = []
    while outbox:
        events.append(outbox.popleft())
    if events:
        dispatcher._group_buffer["task"].extend(events)
        dispatcher.flush(errors=False, groups=True)
