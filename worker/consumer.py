"""The chunk consumer: a Celery task strategy that takes rerank jobs off Celery's hands, unacked, and
scores many of them together.

Three threads share the work so that the model never waits on bookkeeping:

* Celery's event loop receives each job message and hands it over (``chunk_strategy``), unacked;
* the *preparer* validates each job and tokenises its pairs, once (``Ranker.encode``), while
* the *runner* (worker/runner.py) schedules the prepared jobs' pairs into forward batches and settles each
  job as soon as its last pair is scored (worker/settle.py): results written, then acked, then published.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from celery import bootsteps

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock, lanes
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.errors import BadJob, ConfigError, DeadlineExceeded, Misrouted
from rerankq.tasks.records import TRUNCATE, Job
from rerankq.tasks.rerank import MODEL_HEADER
from rerankq.worker import metrics, windows
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Ranker
from rerankq.worker.runner import Ready, Runner
from rerankq.worker.settle import put_back
from rerankq.worker.stats import StatsReporter, WorkerStats
from rerankq.worker.upstream import acks
from rerankq.worker.upstream.patches import bound_heartbeat_retries, flush_task_events, route_task_events
from rerankq.worker.upstream.strategy import receiver

logger = logging.getLogger(__name__)

#: How long a warm shutdown waits for the forward batch running (``ChunkConsumer.stop``): a Kubernetes pod's
#: grace period must be longer (deploy/helm).
STOP_TIMEOUT_S = 60.0
#: Task events wait this long to be published together (``_batch_events``).
EVENTS_FLUSH_S = 0.05

_ranker: Ranker | None = None
_device = "cpu"


def install(ranker: Ranker, device: str) -> None:
    """Make ``ranker`` (loaded on ``device``) the one the chunk consumer of this process serves with."""
    global _ranker, _device
    _ranker, _device = ranker, device


class ChunkConsumer:
    def __init__(self, ranker: Ranker, settings: Settings, backend: Any, hostname: str, broker: BrokerRedis) -> None:
        self.ranker = ranker
        self.settings = settings
        #: Acks the Redis side of each settled job; outlives the consumer's channel across reconnects.
        self.broker = broker
        self._inbox: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._ready = Ready()
        #: Jobs received and not yet settled, by delivery tag (what the watchdog must not reclaim,
        #: worker/reclaim.py). Served whatever becomes of the connection they came on.
        self._held: dict[str, Pending] = {}
        #: Of those, the ones whose channel a reconnect closed (``keep``).
        self._carried: set[str] = set()
        #: The runner outlived ``stop``'s wait: what it holds stays unacked as the channel closes, for the reclaim.
        self._abandoned = False
        self._held_lock = threading.Lock()
        acks.serve_across_reconnects(self)
        self.runner = Runner(ranker, settings, _device, backend, broker, self._ready, hostname, self._settled)
        self._threads = [
            threading.Thread(target=self._prepare_loop, name="rerankq-preparer", daemon=True),
            threading.Thread(target=self.runner.run, name="rerankq-runner", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def put(self, request: Any) -> None:
        """Called by the event loop for each received job; returns at once."""
        routing_key = _routing_key(request)
        pending = Pending(request, clock.now(), routing_key, lanes.lane_of(routing_key))
        with self._held_lock:
            self._held[pending.tag] = pending
            self._carried.discard(pending.tag)  # a new delivery of a job carried over: on the open channel
        with self._ready.cond:
            self._ready.unprepared += 1
        self._inbox.put(pending)

    def held(self) -> dict[str, int]:
        """Jobs held per routing key."""
        with self._held_lock:
            return dict(Counter(pending.queue for pending in self._held.values()))

    def held_tags(self) -> list[str]:
        with self._held_lock:
            return sorted(self._held)

    def keep(self, tags: list[str]) -> set[str]:
        """As a channel closes: the jobs of ``tags`` this consumer goes on serving (all it holds, unless it
        is stopping and its runner stopped in time), which must not be put back (worker/upstream/acks.py
        ``QoS.restore_unacked``)."""
        with self._held_lock:
            if self._ready.stopping and not self._abandoned:
                return set()
            kept = {tag for tag in tags if tag in self._held}
            self._carried |= kept
            return kept

    def carried(self) -> tuple[int, int]:
        with self._held_lock:
            return len(self._carried), sum(1 for tag in self._carried if self._held[tag].lane == lanes.BULK)

    def _settled(self, jobs: Sequence[Pending]) -> None:
        with self._held_lock:
            for pending in jobs:
                if self._held.get(pending.tag) is pending:  # not a later delivery of its job, same tag
                    del self._held[pending.tag]
                    self._carried.discard(pending.tag)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Finish the jobs whose scoring has started; the others go back to the head of their queue: those
        received on the channel still open as it closes (``acks.QoS.restore_unacked``), those received
        before a reconnect here, since no open channel knows them."""
        with self._ready.cond:
            self._ready.stopping = True
            self._ready.cond.notify_all()
        self._inbox.put(None)
        for thread in self._threads:
            thread.join(timeout)
        if any(thread.is_alive() for thread in self._threads):  # it may still write them: left to the reclaim
            with self._held_lock:
                self._abandoned = True  # put back now, a job whose result is still being written runs twice
            logger.warning("the runner did not stop within %.0fs; the jobs it holds stay unacked", timeout)
        else:
            with self._held_lock:
                left = [self._held[tag] for tag in self._carried if tag in self._held]
            for pending in left:
                put_back(self.broker, pending.request.message)
        self.broker.close()

    def _prepare_loop(self) -> None:
        while (pending := self._inbox.get()) is not None:
            self._prepare(pending)
            self._ready.add(pending)

    def _prepare(self, pending: Pending) -> None:
        try:
            settings = self.settings
            job = pending.job = Job.from_call(pending.request.args, pending.request.kwargs, settings.max_docs,
                                                settings.max_query_chars)
            late = clock.now() - job.deadline if job.deadline is not None else 0.0
            if late > 0:  # not worth a moment of tokenising
                raise DeadlineExceeded(f"the deadline passed {late:.3f}s before a worker received this job")
            check_route(pending, settings)
            self.ranker.check_instruction(job.instruction)
            query = pending.query = self.ranker.query_read(job.query, job.instruction)
            mode = windows.effective(job.long_docs or settings.long_docs, self.ranker.kind)
            budget = self.ranker.window_budget(query) if job.docs and mode != TRUNCATE else 0
            pending.texts, pending.owners = windows.expand(job.docs, mode, budget, self.ranker.max_length // 4,
                                                           self.ranker.offsets, settings.window_overlap,
                                                           settings.max_windows)
            if pending.texts:  # tokenised here once: the runner pads forward batches from these ids
                pending.encoded = self.ranker.encode(query, pending.texts)
                pending.costs = pending.encoded.costs
        except (BadJob, DeadlineExceeded, Misrouted) as exc:
            pending.error = exc
        except Exception as exc:  # a tokenizer that chokes on this input fails this job alone
            logger.exception("could not tokenize job %s", pending.request.id)
            pending.error = BadJob(f"could not tokenize this job: {exc!r}")


def check_route(pending: Pending, settings: Settings) -> None:
    """``Misrouted`` for a job sent to a model by name whose queue this worker's RERANKQ_MODELS gives to another
    model (reordered or renamed in some processes and not in others): failed, not scored by the wrong model."""
    stamp = pending.request.request_dict.get(MODEL_HEADER)
    owner = settings.served.by_queue(lanes.base_of(pending.queue, settings.bulk_suffix))
    if stamp is None or owner is None:
        return
    # [served name, path] at the producer: the same model if either is one of the owner's names or its path.
    asked = [str(part) for part in stamp] if isinstance(stamp, list) else [str(stamp)]
    if not set(asked) & {*owner.names(), owner.path}:
        raise Misrouted(f"this job was sent to model {asked[0][:100]!r} on {pending.queue}, which this worker's "
                        f"RERANKQ_MODELS gives to {owner.name!r}: set the same RERANKQ_MODELS in every process of the "
                        "deployment")


def _routing_key(request: Any) -> str:
    return str((request.delivery_info or {}).get("routing_key") or "")


def chunk_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery task strategy: hand each received job to this process's chunk consumer, unacked."""
    if _ranker is None:
        raise ConfigError("rerank jobs need a loaded ranker: start workers with `rerankq worker`")
    chunks: ChunkConsumer | None = getattr(consumer, "rerankq_chunks", None)
    if chunks is None:  # the consumer calls us again after a reconnect: keep the same chunks
        from rerankq.celeryconfig import settings

        chunks = consumer.rerankq_chunks = ChunkConsumer(_ranker, settings, task.backend, consumer.hostname,
                                                         BrokerRedis(app))
        metrics.HELD.set_function(lambda: sum(chunks.held().values()))
        consumer.rerankq_stats = _start_reporter(app, consumer.hostname, chunks, settings.poll_ms / 1000)
    _batch_events(consumer)
    return receiver(task, app, consumer, chunks.put)


def _batch_events(consumer: Any) -> None:
    """Publish task events every ``EVENTS_FLUSH_S``, many in one message, from the event loop.

    Celery buffers task events and publishes them on the event loop's next turn; with the runner thread
    sending them, that is a few per message, and at a few hundred jobs/s a quarter of the worker's time
    (BENCHMARKS.md). Flower sees each event up to ``EVENTS_FLUSH_S`` later instead. Called again after a
    reconnect: the events wait in one outbox kept on the consumer (worker/upstream/patches.py)."""
    dispatcher, hub = consumer.event_dispatcher, consumer.hub
    if dispatcher is None or hub is None or not dispatcher.enabled:
        return
    outbox = getattr(consumer, "rerankq_events", None)
    if outbox is None:
        outbox = consumer.rerankq_events = deque()
    pending = threading.Event()

    def flush() -> None:
        pending.clear()
        if consumer.event_dispatcher is not None:
            flush_task_events(consumer.event_dispatcher, outbox)

    def on_sent() -> None:  # any thread
        if not pending.is_set():
            pending.set()
            hub.call_soon(lambda: hub.call_later(EVENTS_FLUSH_S, flush))

    bound_heartbeat_retries(dispatcher)
    route_task_events(dispatcher, outbox, on_sent)


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
        runner = chunks.runner
        pairs, jobs, busy_s, per_queue = runner.throughput.window()
        # The device column says the number format too ("cpu bf16"): a field of its own would break the readers
        # of an older release during an upgrade (WorkerStats.decode takes every field it is given).
        return WorkerStats(node=node, ranker=ranker.kind, model=ranker.model, device=f"{_device} {ranker.dtype}",
                           held=dict(held), pairs=pairs, jobs=jobs, busy_s=round(busy_s, 6),
                           served=runner.throughput.served,
                           tags=chunks.held_tags(), per_queue=per_queue,
                           busy_ratio=round(runner.recent.busy_ratio(), 4), wait_p95_ms=runner.recent.wait_p95_ms(),
                           metrics_port=metrics.served_port)

    return StatsReporter(BrokerRedis(app), queues, snapshot, interval_s)


class ChunkStep(bootsteps.StartStopStep):
    """Consumer bootstep: at shutdown, let the jobs being scored finish before the connection closes."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def info(self, parent: Any) -> dict[str, Any]:
        """Part of the worker's ``stats`` (``celery inspect stats``, Flower's worker page)."""
        if _ranker is None:
            return {}
        return {"rerankq": {"ranker": _ranker.kind, "model": _ranker.model, "device": _device,
                            "dtype": _ranker.dtype}}

    def shutdown(self, parent: Any) -> None:
        chunks: ChunkConsumer | None = getattr(parent, "rerankq_chunks", None)
        if chunks is not None:
            chunks.stop()
        outbox = getattr(parent, "rerankq_events", None)
        if parent.event_dispatcher is not None and outbox:  # the last jobs' events, still in their 50 ms wait
            try:
                flush_task_events(parent.event_dispatcher, outbox)
            except Exception:
                logger.warning("could not publish the last task events", exc_info=True)
        reporter: StatsReporter | None = getattr(parent, "rerankq_stats", None)
        if reporter is not None:
            reporter.stop()
