"""The chunk consumer: many prefetched jobs -> chunks under a token budget -> one batched inference each.

Three threads share the work so that the GPU never waits on bookkeeping:

* Celery's event loop receives each job message and hands it over (``chunk_strategy``), unacked;
* the *preparer* validates each job and counts its tokens with the model's tokenizer, while
* the *runner* takes the next chunk once it is idle, runs it as one batched inference, writes every
  job's result in one pipelined round trip, only then acks each job, and last publishes the results
  to their waiters (so a waiter never sees a result whose job is still unacked in Redis).

A chunk grows while the previous one runs, and is taken when the budget is full, when no other received
job is still being prepared (a lone job is never held for chunk-mates that are not in sight), or when its
oldest job has waited ``max_wait_ms`` for those being prepared.

Lanes (tasks/lanes.py): a chunk is its interactive jobs, scored and settled first, then the bulk jobs that
fill the rest of its budget; between two forward batches of bulk jobs the runner serves whatever
interactive jobs are ready (``_preempt``), so bulk work delays an interactive job by one forward batch.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import bootsteps
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from celeryconfig import Settings
from tasks import lanes
from tasks.connections import BrokerRedis
from tasks.errors import BadJob, ConfigError, DeadlineExceeded, RankerFailed
from tasks.lanes import BULK, INTERACTIVE, LANES
from tasks.records import ChunkInfo, Job, Result, Timings, top_indices
from tasks.rerank import SENT_AT_HEADER
from worker import metrics, results, transport
from worker.chunker import plan_batches, take_chunk, take_lanes
from worker.rankers import Ranker, is_out_of_memory, release_cached_memory
from worker.stats import Recent, StatsReporter, Throughput, WorkerStats

logger = logging.getLogger(__name__)

#: Task events wait this long to be published together (worker/consumer.py ``_batch_events``)...
EVENTS_FLUSH_S = 0.05
#: ...or until this many are waiting.
EVENTS_BUFFER = 512

_ranker: Ranker | None = None
_device = "cpu"


def install(ranker: Ranker, device: str) -> None:
    """Make ``ranker`` (loaded on ``device``) the one the chunk consumer of this process serves with."""
    global _ranker, _device
    _ranker, _device = ranker, device


@dataclass(eq=False)
class Pending:
    """A received job on its way through the consumer."""

    request: Any
    received: float
    #: The routing key it came with (its queue), and that queue's lane.
    queue: str = ""
    lane: str = INTERACTIVE
    job: Job | None = None
    costs: list[int] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def tokens(self) -> int:
        return sum(self.costs)


class ChunkConsumer:
    def __init__(self, ranker: Ranker, settings: Settings, backend: Any, hostname: str, broker: BrokerRedis) -> None:
        self.ranker = ranker
        self.settings = settings
        self.backend = backend
        #: Acks the Redis side of each chunk; outlives the consumer's channel across reconnects.
        self.broker = broker
        self._inbox: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._ready: dict[str, deque[Pending]] = {lane: deque() for lane in LANES}
        self._ready_tokens = 0
        #: Wall time of interactive chunks run between the forward batches of a bulk one (not its busy time).
        self._preempted_s = 0.0
        #: Jobs put and not yet prepared: chunk-mates on their way.
        self._unprepared = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.throughput = Throughput()
        self.recent = Recent()
        #: Jobs received and not yet settled: delivery tag (what the watchdog must not reclaim,
        #: worker/reclaim.py) -> the routing key it came with (what the backlog counts per queue).
        self._held: dict[str, str] = {}
        self._held_lock = threading.Lock()
        self._chunk_ids = (f"{hostname}#{n}" for n in itertools.count(1))
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="rerankq-preparer", daemon=True),
            threading.Thread(target=self._run_loop, name="rerankq-runner", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def put(self, request: Any) -> None:
        """Called by the event loop for each received job; returns at once."""
        routing_key = _routing_key(request)
        with self._held_lock:
            self._held[request.message.delivery_tag] = routing_key
        with self._cond:
            self._unprepared += 1
        self._inbox.put(Pending(request, time.time(), routing_key, lanes.lane_of(routing_key)))

    def held(self) -> dict[str, int]:
        """Jobs held per routing key."""
        with self._held_lock:
            return dict(Counter(self._held.values()))

    def held_tags(self) -> list[str]:
        with self._held_lock:
            return sorted(self._held)

    def _settled(self, chunk: list[Pending]) -> None:
        with self._held_lock:
            for pending in chunk:
                self._held.pop(pending.request.message.delivery_tag, None)

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the chunk running now; jobs not started stay unacked and go back to the queue."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._inbox.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self.broker.close()

    # -- preparer ---------------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        while (pending := self._inbox.get()) is not None:
            self._prepare(pending)
            with self._cond:
                self._ready[pending.lane].append(pending)
                self._ready_tokens += pending.tokens
                self._unprepared -= 1
                self._cond.notify()

    def _prepare(self, pending: Pending) -> None:
        try:
            job = pending.job = Job.from_call(pending.request.args, pending.request.kwargs,
                                              self.settings.max_docs)
            pending.costs = self.ranker.token_counts(job.query, job.docs) if job.docs else []
        except BadJob as exc:
            pending.error = exc
        except Exception as exc:  # a tokenizer that chokes on this input fails this job alone
            logger.exception("could not tokenize job %s", pending.request.id)
            pending.error = BadJob(f"could not tokenize this job: {exc!r}")

    # -- runner -----------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        while (chunk := self._next_chunk()) is not None:
            for part in chunk:
                # Stopping after the interactive part: the bulk part has not started, and goes back unacked.
                if part and not (part[0].lane == BULK and self._stopping):
                    self._serve(part)

    def _waiting(self) -> int:
        return sum(len(ready) for ready in self._ready.values())

    def _next_chunk(self) -> tuple[list[Pending], list[Pending]] | None:
        """The next chunk as (interactive jobs, bulk jobs); None once stopping."""
        max_wait = self.settings.max_wait_ms / 1000
        with self._cond:
            while not self._waiting() and not self._stopping:
                self._cond.wait()
            while not self._stopping:
                if (self._ready_tokens >= self.settings.max_chunk_tokens
                        or self._waiting() >= self.settings.max_chunk_jobs or not self._unprepared):
                    break
                oldest = min(ready[0].received for ready in self._ready.values() if ready)
                remaining = oldest + max_wait - time.time()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            chunk = take_lanes(self._ready[INTERACTIVE], self._ready[BULK], self.settings.max_chunk_tokens,
                               self.settings.max_chunk_jobs)
            self._ready_tokens -= sum(p.tokens for part in chunk for p in part)
            return chunk

    def _preempt(self) -> None:
        """Between two forward batches of bulk jobs: run the interactive jobs ready now, so that one waits at
        most a forward batch behind bulk work."""
        with self._cond:
            if self._stopping or not self._ready[INTERACTIVE]:
                return
            chunk = take_chunk(self._ready[INTERACTIVE], self.settings.max_chunk_tokens,
                               self.settings.max_chunk_jobs)
            self._ready_tokens -= sum(p.tokens for p in chunk)
        started = time.monotonic()
        self._serve(chunk)
        self._preempted_s += time.monotonic() - started

    def _serve(self, chunk: list[Pending]) -> None:
        """Score one lane's part of a chunk, then write, announce and ack it; on a failure outside the model,
        its jobs go back to the queue to be served again, never left in limbo."""
        try:
            self._score_and_settle(chunk)
        except Exception:
            logger.exception("chunk failed outside the model; requeueing its %d jobs", len(chunk))
            for pending in chunk:
                _requeue(pending.request)
        finally:
            self._settled(chunk)

    def _score_and_settle(self, chunk: list[Pending]) -> None:
        started = time.time()
        preempted_before = self._preempted_s
        live = [p for p in chunk if not p.request.revoked()]  # expired or revoked: Celery settles them
        for pending in live:
            job = pending.job
            if pending.error is None and job is not None and job.deadline is not None and job.deadline < started:
                pending.error = DeadlineExceeded(
                    f"the deadline passed {started - job.deadline:.3f}s before a worker could score this job")
            worker_state.task_accepted(pending.request)
            pending.request.send_event("task-started")

        scored = [p for p in live if p.error is None and p.costs]
        # Bulk jobs make way for interactive ones at every forward batch.
        between = self._preempt if chunk[0].lane == BULK else None
        scores = self._infer(scored, between)
        preempted_s = self._preempted_s - preempted_before
        inference_ms = (time.time() - started - preempted_s) * 1000
        info = ChunkInfo(id=next(self._chunk_ids), jobs=len(live), tokens=sum(p.tokens for p in live))

        outcomes = [self._outcome(p, scores.get(p, []), started, inference_ms, info) for p in live]
        written = results.store(self.backend, outcomes)
        finished = time.time()
        _ack_in_redis(self.broker, [o.request.message for o in outcomes])
        for outcome in outcomes:
            request = outcome.request
            if outcome.result is not None:
                request.send_event("task-succeeded", result=f"{len(outcome.result['scores'])} scores",
                                   runtime=finished - started)
            else:
                logger.warning("job %s failed: %s", request.id, outcome.error)
                request.send_event("task-failed", exception=repr(outcome.error), traceback="")
            request.acknowledge()
            worker_state.task_ready(request, successful=outcome.error is None)
        results.announce(self.backend, written)
        pairs: Counter[str] = Counter()
        for pending in scored:
            pairs[pending.queue] += len(pending.costs)
        self.throughput.add(pairs, Counter(p.queue for p in live), finished - started - preempted_s)
        _record(live, outcomes, sum(pairs.values()), info.tokens, started, inference_ms / 1000, finished,
                self.recent)
        logger.info("chunk %s (%s): %d jobs, %d pairs, %d tokens, inference %.1f ms, total %.1f ms", info.id,
                    chunk[0].lane, info.jobs, sum(pairs.values()), info.tokens, inference_ms,
                    (finished - started) * 1000)

    def _outcome(self, pending: Pending, scores: list[float] | BaseException, started: float,
                 inference_ms: float, info: ChunkInfo) -> results.Outcome:
        if pending.error is not None:
            return results.Outcome(pending.request, error=pending.error)
        if isinstance(scores, BaseException):
            return results.Outcome(pending.request, error=scores)
        assert pending.job is not None
        result = Result(
            scores=scores,
            ranker=self.ranker.kind,
            model=self.ranker.model,
            timings=Timings(queue_ms=round(max(0.0, started - _sent_at(pending)) * 1000, 3),
                            inference_ms=round(inference_ms, 3)),
            top=top_indices(scores, pending.job.top_k) if pending.job.top_k else None,
            chunk=info,
        )
        return results.Outcome(pending.request, result=result.to_dict())

    def _infer(self, jobs: list[Pending], between: Callable[[], None] | None
               ) -> dict[Pending, list[float] | BaseException]:
        """Score the jobs together (calling ``between`` after each forward batch); if the model raises, retry
        by halves so only the culprit fails."""
        if not jobs:
            return {}
        try:
            return dict(zip(jobs, self._score(jobs, self.settings.batch_tokens(_device), between), strict=True))
        except Exception as exc:
            if len(jobs) > 1:
                half = len(jobs) // 2
                logger.warning("model raised on a chunk of %d jobs (%r); retrying by halves", len(jobs), exc)
                return {**self._infer(jobs[:half], between), **self._infer(jobs[half:], between)}
            return {jobs[0]: self._score_alone(jobs[0], exc)}

    def _score_alone(self, pending: Pending, exc: Exception) -> list[float] | BaseException:
        """A single job the model failed on: out of memory shrinks its batches down to one pair."""
        budget = self.settings.batch_tokens(_device)
        while is_out_of_memory(exc) and budget > min(pending.costs):
            release_cached_memory()
            budget //= 2
            try:
                return self._score([pending], budget)[0]
            except Exception as retry_exc:
                exc = retry_exc
        return RankerFailed(f"the {self.ranker.kind} model failed on this job: {exc!r}")

    def _score(self, jobs: list[Pending], batch_tokens: int, between: Callable[[], None] | None = None
               ) -> list[list[float]]:
        pairs: list[tuple[str, str]] = []
        costs: list[int] = []
        for pending in jobs:
            assert pending.job is not None
            pairs.extend((pending.job.query, doc) for doc in pending.job.docs)
            costs.extend(pending.costs)
        flat = [0.0] * len(pairs)
        for batch in plan_batches(costs, batch_tokens):
            began = time.perf_counter()
            scored = self.ranker.score([pairs[i] for i in batch])
            busy_s = time.perf_counter() - began
            for index, score in zip(batch, scored, strict=True):
                flat[index] = score
            lengths = [costs[i] for i in batch]
            padded = len(lengths) * max(lengths)  # batches are padded to their longest pair
            self.recent.busy(busy_s)
            metrics.BUSY.inc(busy_s)
            metrics.BATCH_PAIRS.observe(len(batch))
            metrics.BATCH_PADDED.observe(padded)
            metrics.REAL_TOKENS.inc(sum(lengths))
            metrics.PADDED_TOKENS.inc(padded)
            if between is not None:
                between()
        out, start = [], 0
        for pending in jobs:
            out.append(flat[start:start + len(pending.costs)])
            start += len(pending.costs)
        return out


def _sent_at(pending: Pending) -> float:
    """When the producer sent the job (its header), or when this worker received it."""
    return float(pending.request.request_dict.get(SENT_AT_HEADER) or pending.received)


def _record(live: list[Pending], outcomes: list[results.Outcome], pairs: int, tokens: int, started: float,
            inference_s: float, finished: float, recent: Recent) -> None:
    metrics.CHUNK_JOBS.observe(len(live))
    metrics.CHUNK_PAIRS.observe(pairs)
    metrics.CHUNK_TOKENS.observe(tokens)
    metrics.INFERENCE.observe(inference_s)
    for pending, outcome in zip(live, outcomes, strict=True):
        metrics.JOBS.labels("success" if outcome.error is None else type(outcome.error).__name__).inc()
        sent_at = _sent_at(pending)
        waited = max(0.0, started - sent_at)
        metrics.QUEUE_WAIT.labels(pending.lane).observe(waited)
        metrics.LATENCY.labels(pending.lane).observe(max(0.0, finished - sent_at))
        if pending.lane == INTERACTIVE:
            recent.waited(waited)


def _ack_in_redis(broker: BrokerRedis, messages: list[Any]) -> None:
    """Ack a whole chunk in Redis in one round trip, before its results are published; each job's own
    ``acknowledge()`` on the event loop then only does kombu's bookkeeping."""
    try:
        transport.ack_in_redis(broker.client, broker.unacked_keys(), messages)
    except Exception:
        logger.warning("could not ack a chunk in one round trip; the event loop acks each job", exc_info=True)


def _routing_key(request: Any) -> str:
    return str((request.delivery_info or {}).get("routing_key") or "")


def _requeue(request: Any) -> None:
    try:
        request.reject(requeue=True)
    except Exception:
        logger.exception("could not requeue job %s; it returns after the visibility timeout", request.id)


def chunk_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery task strategy: hand each received job to this process's chunk consumer, unacked."""
    if _ranker is None:
        raise ConfigError("rerank jobs need a loaded ranker: start workers with `rerankq worker`")
    chunks: ChunkConsumer | None = getattr(consumer, "rerankq_chunks", None)
    if chunks is None:  # the consumer calls us again after a reconnect: keep the same chunks
        from celeryconfig import settings

        chunks = consumer.rerankq_chunks = ChunkConsumer(_ranker, settings, task.backend, consumer.hostname,
                                                         BrokerRedis(app))
        metrics.HELD.set_function(lambda: sum(chunks.held().values()))
        consumer.rerankq_stats = _start_reporter(app, consumer.hostname, chunks, settings.poll_ms / 1000)
    _batch_events(consumer)
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
        chunks.put(request)

    return on_message


def _batch_events(consumer: Any) -> None:
    """Publish task events every ``EVENTS_FLUSH_S``, many in one message.

    Celery buffers task events and publishes them on the event loop's next turn; with the runner thread
    sending them, that is a few per message, and at a few hundred jobs/s a quarter of the worker's time
    (BENCHMARKS.md). Flower sees each event up to ``EVENTS_FLUSH_S`` later instead."""
    dispatcher, hub = consumer.event_dispatcher, consumer.hub
    if dispatcher is None or hub is None:
        return
    dispatcher.buffer_limit = EVENTS_BUFFER
    pending = threading.Event()

    def flush() -> None:
        pending.clear()
        consumer._flush_events()

    def on_buffered() -> None:  # any thread
        if not pending.is_set():
            pending.set()
            hub.call_soon(lambda: hub.call_later(EVENTS_FLUSH_S, flush))

    dispatcher.on_send_buffered = on_buffered


def _start_reporter(app: Any, node: str, chunks: ChunkConsumer, interval_s: float) -> StatsReporter:
    ranker = chunks.ranker

    def queues() -> list[str]:
        return sorted(app.amqp.queues.consume_from or app.amqp.queues)

    def snapshot() -> WorkerStats:
        served = queues()
        held: Counter[str] = Counter()
        for key, n in chunks.held().items():
            # A routing key that is not a queue name (custom routing): count it on the first queue.
            held[key if key in served else served[0]] += n
        pairs, jobs, busy_s, per_queue = chunks.throughput.window()
        return WorkerStats(node=node, ranker=ranker.kind, model=ranker.model, device=_device, held=dict(held),
                           pairs=pairs, jobs=jobs, busy_s=round(busy_s, 6), served=chunks.throughput.served,
                           tags=chunks.held_tags(), per_queue=per_queue,
                           busy_ratio=round(chunks.recent.busy_ratio(), 4), wait_p95_ms=chunks.recent.wait_p95_ms(),
                           metrics_port=metrics.served_port)

    return StatsReporter(BrokerRedis(app), queues, snapshot, interval_s)


class ChunkStep(bootsteps.StartStopStep):
    """Consumer bootstep: at shutdown, let the running chunk finish before the connection closes."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def info(self, parent: Any) -> dict[str, Any]:
        """Part of the worker's ``stats`` (``celery inspect stats``, Flower's worker page)."""
        if _ranker is None:
            return {}
        return {"rerankq": {"ranker": _ranker.kind, "model": _ranker.model, "device": _device}}

    def shutdown(self, parent: Any) -> None:
        chunks: ChunkConsumer | None = getattr(parent, "rerankq_chunks", None)
        if chunks is not None:
            chunks.stop()
        if parent.event_dispatcher is not None:  # the last chunk's events, still in their 50 ms wait
            try:
                parent.event_dispatcher.flush()
            except Exception:
                logger.warning("could not publish the last task events", exc_info=True)
        reporter: StatsReporter | None = getattr(parent, "rerankq_stats", None)
        if reporter is not None:
            reporter.stop()
