"""Settling finished jobs: their results written in one pipelined round trip, then acked in Redis in one
more, then their task events and Celery's bookkeeping, and last the results published to their waiters
(a waiter never sees a result whose job is still unacked in Redis).

A thread of its own does it (``Settler``), so the round trips to Redis overlap the next forward batch
instead of delaying it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery.worker import state as worker_state

from rerankq.tasks import clock, memory, tracing
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.errors import RankerFailed
from rerankq.tasks.records import Result, Timings, top_indices
from rerankq.worker import metrics, windows
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Ranker
from rerankq.worker.upstream import acks, results

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: How long the settler waits after putting back jobs whose results a full Redis refused.
FULL_PAUSE_S = 1.0
#: How long a settled batch's ack is tried again over new connections before the event loop is left to ack each
#: job: past a silent connection's timeout and a failover's move (the sentinels are asked every second), and
#: short, for the settler holds every later job meanwhile. Once spent, later acks are tried once each until one
#: reaches Redis (``Settler``).
ACK_PATIENCE_S = 10.0
#: Jobs settled together at most, when several forward batches' wait (one pipeline of results, one ack script).
GATHER_JOBS = 256


class Settler:
    """Settles jobs in the order they were handed over, on its own thread. Jobs whose results could not be
    written (Redis away past its retries) go back to their queue; written ones are never put back (an ack
    lost with Redis leaves the job to be reclaimed and scored again, writing the same result twice).
    ``on_settled`` is called either way, before a job is put back."""

    def __init__(self, ranker: Ranker, backend: Any, broker: BrokerRedis,
                 on_settled: Callable[[Sequence[Pending]], None]) -> None:
        self._ranker, self._backend, self._broker = ranker, backend, broker
        self._on_settled = on_settled
        #: Whether the last ack reached Redis (the settler thread's alone): if not, the next is tried only once.
        self._acks_reach_redis = True
        self._inbox: queue.SimpleQueue[Sequence[Pending] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="rerankq-settler", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[Pending]) -> None:
        if jobs:
            self._inbox.put(jobs)

    def stop(self, timeout: float = 60.0) -> None:
        """Settle everything handed over so far, then end the thread."""
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (jobs := gather(self._inbox)) is not None:
            try:
                self._settle(jobs)
            except Exception:  # a bug: the thread goes on, or every later job would wait for it forever
                logger.exception("could not settle %d jobs; they stay unacked and are reclaimed once no worker "
                                 "holds them", len(jobs))
                try:
                    self._on_settled(jobs)
                except Exception:
                    logger.exception("could not forget %d jobs as held", len(jobs))

    def _settle(self, jobs: Sequence[Pending]) -> None:
        try:
            written = store(jobs, self._ranker, self._backend)
        except Exception as exc:  # Redis away past the backend's retries
            written = Written([], [], [], 0.0, list(jobs), exc)
        if written.refused:
            self._put_back(written.refused, written.error)
        else:
            metrics.REDIS_FULL.set(0)
        if written.jobs:
            try:
                patience = ACK_PATIENCE_S if self._acks_reach_redis else 0.0
                self._acks_reach_redis = finish(written, self._ranker, self._backend, self._broker, patience)
            except Exception:  # written: never requeued; an unacked job returns as a harmless rerun
                logger.exception("wrote the results of %d jobs, then could not ack or announce them all",
                                 len(written.jobs))
            finally:
                self._on_settled(written.jobs)
        if written.refused and written.error is not None and memory.is_full(written.error):
            time.sleep(FULL_PAUSE_S)  # nothing frees memory faster for the jobs coming round again

    def _put_back(self, jobs: list[Pending], error: BaseException | None) -> None:
        if error is not None and memory.is_full(error):
            logger.warning("could not write the results of %d jobs: Redis is full (%s); requeueing them",
                           len(jobs), error)
            metrics.REDIS_FULL.set(1)
        else:
            logger.error("could not write the results of %d jobs; requeueing them", len(jobs), exc_info=error)
        # Not held any more before the reject: received again at once, it must count as held.
        self._on_settled(jobs)
        requeue(jobs, self._broker)


@dataclass(frozen=True)
class Written:
    """The jobs whose outcomes were written (with their outcomes and entries), and those refused."""

    jobs: list[Pending]
    outcomes: list[results.Outcome]
    entries: list[tuple[str, bytes]]
    done: float
    refused: list[Pending]
    error: BaseException | None


def gather(inbox: queue.SimpleQueue[Sequence[T] | None], limit: int = GATHER_JOBS) -> list[T] | None:
    """The next jobs handed over, with the batches handed over since, while fewer than ``limit``: a settler that fell
    behind catches up in one set of round trips instead of one per forward batch. None: stop (after these, if a stop
    came behind them: it is left in the inbox)."""
    jobs = inbox.get()
    if jobs is None:
        return None
    gathered = list(jobs)
    while len(gathered) < limit:
        try:
            more = inbox.get_nowait()
        except queue.Empty:
            break
        if more is None:
            inbox.put(None)
            break
        gathered += more
    return gathered


def store(jobs: Sequence[Pending], ranker: Ranker, backend: Any) -> Written:
    """Write every job's outcome in one pipelined round trip; raises if Redis stays away past the backend's
    retries (the jobs are then put back)."""
    done, stamp = clock.now(), results.Stamp.now(backend)
    settled = [_outcome(pending, ranker, backend, done, stamp) for pending in jobs]
    written, refused, error = results.store(backend, [record for _, record in settled])
    refused_at = set(refused)
    kept = [i for i in range(len(jobs)) if i not in refused_at]
    return Written([jobs[i] for i in kept], [settled[i][0] for i in kept], written, done,
                   [jobs[i] for i in refused], error)


def finish(written: Written, ranker: Ranker, backend: Any, broker: BrokerRedis,
           ack_patience_s: float = ACK_PATIENCE_S) -> bool:
    """Ack the written jobs in Redis, send their events, do Celery's bookkeeping, announce the results.
    Returns whether the ack reached Redis (``ack_all``)."""
    jobs, outcomes, done = written.jobs, written.outcomes, written.done
    acked = ack_all(broker, [outcome.request.message for outcome in outcomes], ack_patience_s)
    for pending, outcome in zip(jobs, outcomes, strict=True):
        request = outcome.request
        if outcome.result is not None:
            request.send_event("task-succeeded", result=f"{len(outcome.result['scores'])} scores",
                               runtime=done - (pending.started or done))
        else:
            logger.warning("job %s failed: %s", request.id, outcome.error)
            request.send_event("task-failed", exception=repr(outcome.error), traceback="")
        request.acknowledge()
        worker_state.task_ready(request, successful=outcome.error is None)
        metrics.JOBS.labels("success" if outcome.error is None else type(outcome.error).__name__).inc()
        metrics.LATENCY.labels(pending.lane).observe(max(0.0, done - pending.sent_at))
        if pending.batches and pending.started is not None:
            metrics.INFERENCE.observe(done - pending.started)
    results.announce(backend, written.entries)
    for pending, outcome in zip(jobs, outcomes, strict=True):  # after the answers: no waiter waits for a trace
        _trace(pending, ranker, done, outcome.error)
    return acked


def requeue(jobs: Sequence[Pending], broker: BrokerRedis) -> None:
    """Put jobs back at the head of their queue to be served again (a failure outside the model). The event
    loop does it (Celery's reject runs there), checking that the delivery is still this one: a job reclaimed
    and received again meanwhile is left to its new delivery (worker/upstream/transport.py ``put_back``).
    A job received before a reconnect goes back here, through ``broker``: its channel is closed."""
    for pending in jobs:
        message = pending.request.message
        try:
            if message.channel.closed:
                put_back(broker, message)
            else:
                message.to_head = True
            pending.request.reject(requeue=True)
        except Exception:
            logger.exception("could not requeue job %s; it stays unacked and is reclaimed once no worker holds it",
                             pending.request.id)
        worker_state.task_ready(pending.request)


def put_back(broker: BrokerRedis, message: Any) -> None:
    """Put the delivery ``message`` back at the head of its queue from any thread: only for a message whose
    channel is closed, whose bookkeeping no receive shares any more."""
    if getattr(message, "delivered_at", None) is None:
        return  # kombu's own receive (several queues): left unacked, reclaimed
    try:
        broker.put_back(message.delivery_tag, message.delivered_at)
    except Exception:
        logger.warning("could not put job %s back; it stays unacked and is reclaimed once no worker holds it",
                       message.delivery_tag, exc_info=True)


def _outcome(pending: Pending, ranker: Ranker, backend: Any, done: float,
             stamp: results.Stamp) -> tuple[results.Outcome, tuple[str, bytes]]:
    """The job's outcome and its result record. Building or encoding it fails this job alone: raising here
    would read as Redis away, and the job would go back, to fail again with its batch-mates each time."""
    try:
        outcome = _built(pending, ranker, done)
        return outcome, results.entry(backend, outcome, stamp)
    except Exception as exc:
        logger.exception("could not build the result of job %s", pending.request.id)
        outcome = results.Outcome(pending.request, error=RankerFailed(
            f"the worker could not build this job's result: {exc!r}"))
        return outcome, results.entry(backend, outcome, stamp)


def _built(pending: Pending, ranker: Ranker, done: float) -> results.Outcome:
    if pending.error is not None:
        return results.Outcome(pending.request, error=pending.error)
    assert pending.job is not None
    started = pending.started or done
    try:
        raw = windows.best(pending.scores, pending.owners, len(pending.job.docs))  # a doc: its best piece
        scores = raw if pending.job.raw_scores else ranker.activate(raw)
    except Exception as exc:  # this job's failure, not Redis's: never requeued
        return results.Outcome(pending.request, error=RankerFailed(f"the {ranker.kind} model's activation failed "
                                                                   f"on this job: {exc!r}"))
    result = Result(
        scores=scores,
        ranker=ranker.kind,
        model=ranker.model,
        timings=Timings(queue_ms=round(max(0.0, started - pending.sent_at) * 1000, 3),
                        inference_ms=round((done - started) * 1000, 3)),
        top=top_indices(scores, pending.job.top_k) if pending.job.top_k else None,
        batches=pending.batches,
    )
    return results.Outcome(pending.request, result=result.to_dict())


def _trace(pending: Pending, ranker: Ranker, done: float, error: BaseException | None) -> None:
    try:
        tracing.settled(pending.request.request_dict, pending.request.id, {
            "rerankq.queue": pending.queue, "rerankq.lane": pending.lane, "rerankq.ranker": ranker.kind,
            "rerankq.model": ranker.model, "rerankq.docs": len(pending.job.docs) if pending.job else 0,
            "rerankq.pairs": len(pending.costs)}, pending.sent_at, pending.started, done, pending.batches, error)
    except Exception:  # a trace is never worth a job
        logger.warning("could not record the trace of job %s", pending.request.id, exc_info=True)


def ack_all(broker: BrokerRedis, messages: list[Any], patience_s: float = ACK_PATIENCE_S) -> bool:
    """Ack the jobs in Redis in one round trip, before their results are published; each job's own
    ``acknowledge()`` on the event loop then only does kombu's bookkeeping (and, for a job received before
    a reconnect, nothing in Redis: its channel is closed).

    A lost connection (timed out, closed, a failover's old master) is tried again on a new one for up to
    ``patience_s`` (and at least once), the jobs still held meanwhile (a reconnect does not put them back): the
    event loop's own connection is as likely dead, and an ack lost there left the job unacked for the reclaim,
    scored twice. The ack is safe to send twice: it removes only its own delivery's record. Not a delivery
    whose time is unknown (kombu's own receive: Redis before 6.2), acked by tag alone, which would remove a
    later delivery's record. Returns whether the ack reached Redis."""
    if any(getattr(message, "delivered_at", None) is None for message in messages):
        patience_s = 0.0
    deadline, pause, tries = time.monotonic() + patience_s, 0.0, 0
    while True:
        tries += 1
        try:
            acks.ack_in_redis(broker.client, broker.unacked_keys(), messages)
            return True
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if patience_s <= 0 or (tries > 1 and time.monotonic() + pause >= deadline):
                error: Exception = exc
                break
            logger.warning("could not ack %d jobs (%r); trying again on a new connection", len(messages), exc)
            time.sleep(pause)
            pause = min(1.0, max(0.1, 2 * pause))
        except Exception as exc:
            error = exc
            break
    logger.warning("could not ack %d jobs in one round trip; the event loop acks each", len(messages),
                   exc_info=error)
    return False
