"""The runner: one thread that keeps the model busy, one forward batch at a time.

Prepared jobs wait in ``Ready``, per lane. Between two forward batches the runner admits ready jobs into
its window (worker/batching.py ``admit``), picks the next batch's pairs from the whole window
(``next_batch``: interactive ahead of bulk, length-sorted, under the padded-token budget and the batch-time
target), runs it, and settles the jobs whose last pair it scored (worker/settle.py). So a job that arrives
while others are being scored joins the next forward batch, and its result goes out as soon as its own
pairs are done, not when its batch-mates' are.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery.worker import state as worker_state

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.errors import DeadlineExceeded, DeviceLost, RankerFailed
from rerankq.tasks.lanes import BULK, INTERACTIVE, LANES
from rerankq.tasks.records import BatchInfo
from rerankq.worker import metrics
from rerankq.worker.batching import (
    BUSY_S,
    KEEP,
    QUIET_S,
    Turns,
    admit,
    after_out_of_memory,
    budgets,
    next_batch,
    target_tokens,
)
from rerankq.worker.model import Model, padded_tokens
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Ranker
from rerankq.worker.settle import Settler, ack_all, requeue
from rerankq.worker.stats import Busy, Recent, Throughput

logger = logging.getLogger(__name__)


#: Set once the GPU failed for good (``Runner._lose_device``); the worker then exits with ``DEVICE_LOST_EXIT``.
device_lost = threading.Event()
DEVICE_LOST_EXIT = 3


#: How long a job is remembered as having been in a batch the GPU failed on (``suspects``).
SUSPECT_S = 3600


def suspects(broker: BrokerRedis, jobs: Sequence[Pending]) -> list[Pending]:
    """Of the jobs of a batch the GPU failed on, those that were in such a batch before (counted in Redis,
    ``rerankq:device-lost:<job id>``, for ``SUSPECT_S``). None if Redis cannot say: they go back, and a
    poison input costs one more restart."""
    ids = list(dict.fromkeys(pending.request.id for pending in jobs))  # a job received again: counted once
    try:
        pipe = broker.client.pipeline(transaction=False)
        for job_id in ids:
            key = broker.key("device-lost", job_id)
            pipe.incr(key)
            pipe.expire(key, SUSPECT_S)
        counts = dict(zip(ids, pipe.execute()[::2], strict=True))
    except Exception:
        logger.warning("could not count the jobs the GPU failed on; they go back to their queue", exc_info=True)
        return []
    return [pending for pending in jobs if int(counts[pending.request.id]) > 1]


@dataclass(eq=False)
class Ahead:
    """A forward batch chosen and prepared before the one running is read."""

    batch: list[tuple[Pending, int]]
    #: ``Runner._joiners`` when it was chosen: interactive jobs admitted since were not considered.
    joiners: int
    #: Whether bulk jobs were in the window (``Turns``).
    bulk_waits: bool
    prepared: Any = None

    def by_job(self) -> dict[Pending, list[int]]:
        indices: dict[Pending, list[int]] = {}
        for pending, index in self.batch:
            indices.setdefault(pending, []).append(index)
        return indices

    def give_back(self) -> None:
        for pending, indices in self.by_job().items():
            if pending.error is None:
                pending.give_back(indices)


class Ready:
    """Prepared jobs per lane, in arrival order, on their way into the runner's window (the preparer adds,
    the runner takes; everything under ``cond``)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.lanes: dict[str, deque[Pending]] = {lane: deque() for lane in LANES}
        #: Jobs received and not prepared yet: window-mates on their way.
        self.unprepared = 0
        self.stopping = False
        #: When the last interactive job was prepared (monotonic clock).
        self.last_interactive = float("-inf")

    def add(self, pending: Pending) -> None:
        with self.cond:
            self.lanes[pending.lane].append(pending)
            self.unprepared -= 1
            if pending.lane == INTERACTIVE:
                self.last_interactive = time.monotonic()
            self.cond.notify()

    def waiting(self) -> int:
        return sum(len(jobs) for jobs in self.lanes.values())


class Runner:
    def __init__(self, ranker: Ranker, settings: Settings, device: str, backend: object, broker: BrokerRedis,
                 ready: Ready, hostname: str, on_settled: Callable[[Sequence[Pending]], None]) -> None:
        self.ranker = ranker
        self.settings = settings
        self.ready = ready
        self.throughput = Throughput()
        self.recent = Recent()
        self.window: list[Pending] = []
        self._on_settled = on_settled
        self._broker = broker
        self._settler = Settler(ranker, backend, broker, on_settled)
        self._max_batch = settings.batch_tokens(device, ranker.fits_tokens)
        self._model = Model(ranker, self.recent)
        self._busy = Busy(BUSY_S)
        self._batch_ids = (f"{hostname}#{n}" for n in itertools.count(1))
        #: Forward batches chosen, and of those in a row without bulk pairs while bulk jobs waited (``Turns``).
        self._batches = 0
        self._without_bulk = 0
        #: The next batch, chosen and prepared while the one before it runs (``_step``).
        self._ahead: Ahead | None = None
        #: Interactive jobs admitted into the window so far: each joins the next batch (``next_batch``).
        self._joiners = 0
        self._max_batch_said = self._max_batch
        #: Per lane: jobs wait in Ready that the window could not take.
        self._backlog: dict[str, bool] = {}

    def run(self) -> None:
        """The runner thread: until stopped, then the jobs it finished settled. It never dies of one job:
        on a failure outside the model (Redis away while a revoked job is announced, ...) the jobs in its
        window go back to their queue and it goes on."""
        try:
            while True:
                try:
                    if not self._admit():
                        return
                    if self.window:
                        metrics.WORK.begin()  # /healthz fails while a batch runs past metrics.STALL_S
                        try:
                            self._step()
                        finally:
                            metrics.WORK.end()
                except DeviceLost:
                    self._lose_device()
                    return
                except Exception:
                    logger.exception("the runner failed outside the model; requeueing its %d jobs in progress",
                                     len(self.window))
                    jobs, self.window, self._ahead = self.window, [], None
                    self._on_settled(jobs)
                    requeue(jobs, self._broker)
        finally:
            self._settler.stop()

    def _lose_device(self) -> None:
        """The GPU is in an error state this process cannot leave: every job it holds goes back to its queue,
        and the worker ends (a warm shutdown, exit status ``DEVICE_LOST_EXIT``) to be started again."""
        ready = self.ready
        with ready.cond:
            ready.stopping = True
            waiting = [pending for lane in ready.lanes.values() for pending in lane]
            for lane in ready.lanes.values():
                lane.clear()
        jobs, self.window, self._ahead = [*self.window, *waiting], [], None
        logger.critical("the GPU is in an error state this process cannot leave: %d job(s) go back to their "
                        "queue and the worker exits to be restarted", len(jobs))
        self._on_settled(jobs)
        requeue(jobs, self._broker)
        device_lost.set()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: its event loop puts the jobs back

    # -- the window -------------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Let ready jobs into the window; wait while there is nothing to do. False once stopped and done."""
        ready = self.ready
        with ready.cond:
            while not self.window and not ready.waiting() and not ready.stopping:
                ready.cond.wait()
            if not self.window:
                self._gather()
            if ready.stopping:
                # After the batch that ran last: every job not finished stays unacked and goes back to the
                # queue when the connection closes (its scores so far are dropped), so a warm shutdown
                # takes one forward batch, not the rest of a large job.
                self.window, self._ahead = [], None
                return False
            admitted = admit(ready.lanes[INTERACTIVE], ready.lanes[BULK], self.window,
                             self.settings.max_chunk_tokens, self.settings.max_chunk_jobs)
            self._backlog = {lane: bool(jobs) for lane, jobs in ready.lanes.items()}
        self.window.extend(admitted)  # from here on, a failure puts them back with the rest
        done = []
        for pending in admitted:
            if pending.request.revoked():  # expired or revoked: Celery settles them
                if pending.request.id in worker_state.revoked:
                    metrics.CANCELLED.inc()
                self.window.remove(pending)
                if pending.request.message.channel.closed:  # received before a reconnect: Celery's ack is lost
                    ack_all(self._broker, [pending.request.message])
                self._on_settled([pending])
            elif pending.error is None and pending.costs:
                pending.begin()
                self._joiners += pending.lane == INTERACTIVE
            else:  # bad input, or no docs: an outcome at once
                done.append(pending)
        self._start(done, clock.now())
        self._finish(done)
        return True

    def _gather(self) -> None:
        """Idle: wait up to ``max_wait_ms`` for the jobs still being prepared, so that a burst that arrives
        together is scored together; never for jobs not in sight."""
        ready, max_wait = self.ready, self.settings.max_wait_ms / 1000
        while not ready.stopping and ready.unprepared:
            waiting = [p for jobs in ready.lanes.values() for p in jobs]
            if (sum(p.tokens for p in waiting) >= self.settings.max_chunk_tokens
                    or len(waiting) >= self.settings.max_chunk_jobs):
                return
            remaining = min(p.received for p in waiting) + max_wait - clock.now()
            if remaining <= 0:
                return
            ready.cond.wait(remaining)

    def _start(self, jobs: Sequence[Pending], now: float) -> None:
        for pending in jobs:
            pending.started = now
            worker_state.task_accepted(pending.request)
            pending.request.send_event("task-started")
            waited = max(0.0, now - pending.sent_at)
            metrics.QUEUE_WAIT.labels(pending.lane).observe(waited)
            if pending.lane == INTERACTIVE:
                self.recent.waited(waited)

    def _finish(self, jobs: Sequence[Pending]) -> None:
        """Hand jobs that have their outcome to the settler, once: a job failed while it had pairs in a batch
        (its deadline passed before the batch chosen ahead ran) is in that batch's jobs too."""
        window = set(self.window)
        jobs = [p for p in jobs if p in window]
        if not jobs:
            return
        gone = set(jobs)
        self.window = [p for p in self.window if p not in gone]
        self._settler.submit(jobs)

    # -- one forward batch ------------------------------------------------------------------------

    def _choose(self) -> Ahead | None:
        """The next forward batch: its pairs taken off their jobs and its inputs prepared."""
        pace, now = self._model.pace, time.monotonic()
        web = now - self.ready.last_interactive < QUIET_S
        max_batch = self._max_batch_now()
        bulk_waits = any(p.lane == BULK for p in self.window)
        target = target_tokens(pace.tokens_for(self.settings.target_batch_ms / 1000, max_batch),
                               self._busy.ratio(now), bulk_waits)
        budget = budgets(max_batch, target, self._backlog, pace.keeping(KEEP, max_batch) if web else None)
        batch = next_batch(self.window, budget, Turns.after(self._batches, self._without_bulk))
        if not batch:
            return None
        ahead = Ahead(batch, self._joiners, bulk_waits)
        try:
            ahead.prepared = self._model.prepare(batch)
        except DeviceLost:
            raise
        except Exception:  # prepared again at its launch, where a failure is the batch's (retried by halves)
            logger.warning("could not prepare a forward batch ahead", exc_info=True)
        for pending, indices in ahead.by_job().items():
            pending.take(indices)
        return ahead

    def _count(self, batch: Ahead) -> None:
        """A batch that runs (not one chosen ahead and given back): the turns count it."""
        self._batches += 1
        has_bulk = any(p.lane == BULK for p, _ in batch.batch)
        self._without_bulk = self._without_bulk + 1 if batch.bulk_waits and not has_bulk else 0

    def _max_batch_now(self) -> int:
        budget = after_out_of_memory(self._max_batch, self._model.out_of_memory_at, self.ranker.max_length)
        if budget < self._max_batch_said:
            logger.warning("a forward batch of %d padded tokens ran out of memory: batches now take at most %d "
                           "(RERANKQ_MAX_BATCH_TOKENS=%d)", self._model.out_of_memory_at, budget, self._max_batch)
            self._max_batch_said = budget
        return budget

    def _step(self) -> None:
        began, began_mono = clock.now(), time.monotonic()  # a stamp other hosts read; a duration
        self._expire(began)
        current, self._ahead = self._ahead, None
        if current is not None and current.joiners != self._joiners and not self._backlog.get(INTERACTIVE):
            # Chosen before interactive jobs came that join the next batch: chosen again with them. (A saturated
            # lane sweeps: jobs that come join no batch before their turn, and the batch stands.)
            current.give_back()
            current = None
        current = current or self._choose()
        if current is None:
            return
        self._count(current)
        batch, now = current.batch, time.monotonic()
        jobs = [p for p in dict.fromkeys(p for p, _ in batch) if p.error is None]  # not one settled meanwhile
        try:
            self._start([p for p in jobs if p.started is None], began)
            info = BatchInfo(id=next(self._batch_ids), jobs=len(jobs), pairs=len(batch),
                             padded_tokens=padded_tokens(batch))
            for pending in jobs:
                pending.batches.append(info)
            flight = self._model.launch(batch, current.prepared)
            if flight is not None:
                # The next batch is padded, and copied to a GPU, while this one runs there (on a CPU, after): from
                # the window as it is, chosen again if interactive jobs are admitted before it runs.
                self._ahead = self._choose()
                self._model.land(flight)
        except DeviceLost as exc:
            # This batch's jobs go back with the others, but one that was in such a batch before fails: an input
            # that makes the device assert would take down every worker it reached, one after another.
            for pending in suspects(self._broker, jobs):
                pending.fail(exc)
            self._finish([p for p in jobs if p.error is not None])
            raise
        except Exception as exc:  # a bug, not the model (worker/model.py catches that): an outcome, not a loop
            logger.exception("forward batch failed outside the model; failing its %d jobs", len(jobs))
            for pending in jobs:
                pending.fail(RankerFailed(f"the worker failed while scoring this job: {exc!r}"))
        ended = time.monotonic()
        self._busy.add(ended, ended - now)
        finished = [p for p in jobs if p.done]
        self._finish(finished)
        pairs = Counter(p.queue for p, _ in batch)
        self.throughput.add(pairs, Counter(p.queue for p in finished if p.error is None),
                            time.monotonic() - began_mono)

    def _expire(self, now: float) -> None:
        """Jobs whose deadline passed before their first forward batch fail without being scored."""
        expired = []
        for pending in self.window:
            deadline = pending.job.deadline if pending.job else None
            if pending.started is None and deadline is not None and deadline < now:
                pending.fail(DeadlineExceeded(
                    f"the deadline passed {now - deadline:.3f}s before a worker could score this job"))
                expired.append(pending)
        self._start(expired, now)
        self._finish(expired)
