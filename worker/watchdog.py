"""``rerankq watchdog``: measure the GPU queue's backlog every poll, and shed new jobs while it is too long.

Hysteresis keeps the route from flapping: the route turns to ``shed`` when the GPU queue's estimated wait
(or backlog, with the job-count marks) goes above the high mark, and back to ``gpu`` only once it is at
or below the low mark. The CPU queue is gated the same way (``cpu_open``); a queue with no live worker
counts as over its high mark, and one whose workers have not yet measured their speed takes no more than
a chunk (``RERANKQ_MAX_CHUNK_JOBS``) per worker. The state is written with a TTL refreshed every poll, so
routing falls back to the GPU queue when the watchdog stops. Each change is logged and added to a Redis
stream.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock, lanes, memory
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import GPU, SHED, QueueLoad, RouteState, changes_key, counts_key, state_key
from rerankq.worker import metrics
from rerankq.worker.backlog import measure
from rerankq.worker.lease import Lease
from rerankq.worker.reclaim import reclaim
from rerankq.worker.stats import WorkerStats, grace_for, model_loads_key

logger = logging.getLogger(__name__)

#: Route changes kept in the stream (approximately: trimmed with ``MAXLEN ~``).
CHANGES_KEPT = 1000


@dataclass(frozen=True)
class Marks:
    high_wait_s: float
    low_wait_s: float
    #: Backlog per live worker a queue may take while its wait is unknown (no batch measured yet): one
    #: window's worth, which its first batches serve. Without it a cold queue (the fast ranker's, when shedding
    #: starts) takes every shed job until its workers first report, and they wait for seconds.
    cold_jobs: int
    high_jobs: int = 0
    low_jobs: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Marks:
        return cls(settings.high_wait_s, settings.low_wait_s, settings.max_chunk_jobs, settings.high_jobs,
                   settings.low_jobs)

    def _cold_over(self, load: QueueLoad) -> bool:
        return load.backlog > self.cold_jobs * load.workers

    def over_high(self, load: QueueLoad) -> bool:
        wait = load.wait_s
        return ((self._cold_over(load) if wait is None else wait > self.high_wait_s)
                or bool(self.high_jobs and load.backlog > self.high_jobs))

    def under_low(self, load: QueueLoad) -> bool:
        wait = load.wait_s
        # A cold queue's only mark is its cap: once closed it gets no new jobs, so its backlog cannot flap.
        return ((not self._cold_over(load) if wait is None else wait <= self.low_wait_s)
                and not (self.high_jobs and load.backlog > self.low_jobs))

    def describe(self) -> str:
        jobs = f", jobs high {self.high_jobs} / low {self.low_jobs}" if self.high_jobs else ""
        return f"wait high {self.high_wait_s}s / low {self.low_wait_s}s{jobs}"

    def overloaded(self, was_overloaded: bool, load: QueueLoad) -> bool:
        """Hysteresis: becomes overloaded above the high mark, stays so until at or below the low mark."""
        return not self.under_low(load) if was_overloaded else self.over_high(load)


class Watchdog:
    def __init__(self, broker: BrokerRedis, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self.marks = Marks.from_settings(settings)
        self.gpu_queue, self.cpu_queue = settings.gpu_queue, settings.cpu_queue
        self.queues = lanes.both([self.gpu_queue, self.cpu_queue], settings.bulk_suffix)
        self.state: RouteState | None = None
        self.reclaim_grace_s = grace_for(settings.poll_ms / 1000)
        self._reclaim_offset = 0
        self._full = False
        # Half the route TTL, so a stand-by leads before the route expires; but never under a poll and a half,
        # or the lease would lapse between two renewals.
        self.lease = Lease(broker, self.gpu_queue, max(settings.route_ttl_s / 2, 1.5 * settings.poll_ms / 1000))
        self.leading: bool | None = None

    def _resume(self) -> RouteState:
        """Carry on from the state a previous watchdog left (a restart must not flip the route)."""
        raw = self.broker.client.get(state_key(self.broker, self.gpu_queue))
        if raw:
            return RouteState.decode(raw)
        return RouteState(route=GPU, cpu_open=True, since=clock.now(), at=clock.now())

    def poll(self) -> RouteState | None:
        """Lead: measure, decide, write the state, log and record a change, and return the new state. Stand
        by while another watchdog leads (the lease): return None."""
        leading = self.lease.hold()
        if leading != self.leading:
            if leading:
                logger.info("leading: this watchdog measures and writes the route")
            else:
                logger.info("standing by: watchdog %s leads", self.lease.leader())
            self.leading = leading
            metrics.LEADING.set(leading)
        if not leading:
            self.state = None  # on taking over, carry on from the state the leader left
            return None
        # Bulk lanes are measured for the record, never judged: a bulk run waits its turn and sheds nothing.
        snapshot = measure(self.broker, self.queues, self.settings.poll_ms / 1000)
        self._reclaim([w for workers in snapshot.workers.values() for w in workers])
        gpu, cpu = snapshot.loads[self.gpu_queue], snapshot.loads[self.cpu_queue]
        previous = self.state or self._resume()
        shedding = self.marks.overloaded(previous.route == SHED, gpu)
        cpu_open = not self.marks.overloaded(not previous.cpu_open, cpu)
        route = SHED if shedding else GPU
        now = clock.now()
        changed = route != previous.route or cpu_open != previous.cpu_open
        reason = self._reason(route, cpu_open, gpu, cpu) if changed else previous.reason
        self.state = RouteState(route=route, cpu_open=cpu_open, since=now if changed else previous.since, at=now,
                                reason=reason, loads=snapshot.loads, metrics_port=metrics.served_port,
                                leader=self.lease.holder)
        with self.broker.client.pipeline(transaction=False) as pipe:
            pipe.set(state_key(self.broker, self.gpu_queue), self.state.encode(),
                     px=int(self.settings.route_ttl_s * 1000))
            if changed:
                pipe.xadd(changes_key(self.broker, self.gpu_queue),
                          {"route": route, "cpu_open": int(cpu_open), "at": now, "gpu_backlog": gpu.backlog,
                           "gpu_wait_s": str(gpu.wait_s), "cpu_backlog": cpu.backlog, "cpu_wait_s": str(cpu.wait_s),
                           "reason": reason},
                          maxlen=CHANGES_KEPT, approximate=True)
            # Counters producers and workers keep, re-exported as metrics (same round trip).
            pipe.hgetall(counts_key(self.broker, self.gpu_queue))
            for queue in (self.gpu_queue, self.cpu_queue):
                pipe.hgetall(model_loads_key(self.broker, queue))
            *_, routed, gpu_loads, cpu_loads = pipe.execute()
        self._export(changed, routed, {self.gpu_queue: gpu_loads, self.cpu_queue: cpu_loads})
        if changed:
            level = logging.WARNING if route == SHED else logging.INFO
            logger.log(level, "route %s/%s -> %s/%s: %s", previous.route, _gate(previous.cpu_open), route,
                       _gate(cpu_open), reason)
        return self.state

    def watch_memory(self) -> None:
        """Export Redis's memory, and say when it fills up (every write of new jobs and results refused)
        and when it has room again."""
        now = memory.memory(self.broker.client)
        metrics.REDIS_MEMORY.labels("used").set(now.used)
        metrics.REDIS_MEMORY.labels("limit").set(now.limit)
        metrics.REDIS_FULL.set(now.full)
        if now.full != self._full:
            if now.full:
                logger.error("Redis is full: %s. Producers get RedisFull; workers serve what is queued; raise "
                             "maxmemory or free memory", now.describe())
            else:
                logger.info("Redis has room again: %s", now.describe())
            self._full = now.full

    def _reclaim(self, live: list[WorkerStats]) -> None:
        try:
            reclaimed, self._reclaim_offset = reclaim(self.broker, self.queues, live, self.reclaim_grace_s,
                                                      self._reclaim_offset)
        except Exception:  # never let reclaiming stop the routing
            logger.exception("could not reclaim orphaned jobs; they return after the visibility timeout")
            return
        metrics.RECLAIMED.inc(len(reclaimed))

    def _export(self, changed: bool, routed: dict[bytes, bytes], loads: dict[str, dict[bytes, bytes]]) -> None:
        assert self.state is not None
        metrics.ROUTE_SHED.set(self.state.route == SHED)
        metrics.CPU_OPEN.set(self.state.cpu_open)
        if changed:
            metrics.ROUTE_CHANGES.labels(self.state.route).inc()
        metrics.record_loads(self.state.loads)
        metrics.REDIS_COUNTERS.routed = {k.decode(): int(v) for k, v in routed.items()}
        metrics.REDIS_COUNTERS.model_loads = {(queue, k.decode()): int(v)
                                              for queue, counts in loads.items() for k, v in counts.items()}

    def _reason(self, route: str, cpu_open: bool, gpu: QueueLoad, cpu: QueueLoad) -> str:
        return (f"{gpu.describe()}; {cpu.describe()} (marks: {self.marks.describe()}); new jobs go to "
                + (self.gpu_queue if route == GPU else self.cpu_queue if cpu_open else "passthrough"))

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a Redis error is logged and the next poll tries again."""
        failing = False
        while not stop.is_set():
            started = time.monotonic()
            metrics.WORK.begin()  # /healthz fails while a poll runs past metrics.STALL_S
            try:
                self.watch_memory()
                self.poll()
                if failing:
                    logger.info("Redis is reachable again")
                failing = False
            except Exception as exc:
                if not failing:
                    logger.error("cannot measure or write the route state (%r); producers fall back to %s "
                                 "once the state expires", exc, self.gpu_queue)
                failing = True
            finally:
                metrics.WORK.end()
            stop.wait(max(0.0, self.settings.poll_ms / 1000 - (time.monotonic() - started)))


def recent_changes(broker: BrokerRedis, gpu_queue: str, count: int | None = None) -> list[dict[str, str]]:
    """Route changes from the stream, newest first: route, cpu_open, at, gpu/cpu backlog and wait, reason."""
    entries: Any = broker.client.xrevrange(changes_key(broker, gpu_queue), count=count)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def _gate(cpu_open: bool) -> str:
    return "cpu open" if cpu_open else "cpu closed"


def run_watchdog(loglevel: str, metrics_port: int) -> int:
    """The ``rerankq watchdog`` process: polls until SIGTERM or Ctrl-C."""
    import signal

    from rerankq.celeryconfig import settings
    from rerankq.tasks import app

    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/watchdog] %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info(metrics.describe(metrics_port, metrics.serve(metrics_port, settings.metrics_address)))
    metrics.READY.set()
    broker = BrokerRedis(app)
    watchdog = Watchdog(broker, settings)
    logger.info("watching %s (and %s) every %.0f ms; marks: %s; route state TTL %.1fs", settings.gpu_queue,
                settings.cpu_queue, settings.poll_ms, watchdog.marks.describe(), settings.route_ttl_s)
    watchdog.run(stop)
    watchdog.lease.release()
    broker.close()
    logger.info("stopped; producers fall back to %s within %.1fs", settings.gpu_queue, settings.route_ttl_s)
    return 0
