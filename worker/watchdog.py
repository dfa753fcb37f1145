"""``rerankq watchdog``: measure each model's queue's backlog every poll, and shed its new jobs while it is too
long (each served model is judged apart, tasks/models.py; the text below says "the GPU queue" for any one).

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
from typing import Any

from rerankq.celeryconfig import Settings
from rerankq.tasks import clock, lanes, memory
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.models import Models, ServedModel
from rerankq.tasks.router import GPU, SHED, QueueLoad, RouteState, changes_key, counts_key, state_key
from rerankq.worker import metrics
from rerankq.worker.backlog import measure
from rerankq.worker.lease import Lease
from rerankq.worker.marks import Marks
from rerankq.worker.reclaim import reclaim
from rerankq.worker.stats import WorkerStats, grace_for, model_loads_key

logger = logging.getLogger(__name__)

#: Route changes kept in the stream (approximately: trimmed with ``MAXLEN ~``).
CHANGES_KEPT = 1000


class Watchdog:
    """Judges every served model's queue apart (tasks/models.py), each with its own route state, and each
    fast-ranker queue once for all the models that shed to it. ``state`` is the default model's."""

    def __init__(self, broker: BrokerRedis, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self.marks = Marks.from_settings(settings)
        self.models = settings.served
        #: Each model's marks (its own, or the deployment's); the fast-ranker queues are judged by the deployment's.
        self.model_marks = {m.queue: Marks.from_settings(settings, m) for m in self.models}
        self.gpu_queue, self.cpu_queue = self.models.default.queue, settings.cpu_queue
        self.queues = lanes.both([*(m.queue for m in self.models), *self.models.fallbacks], settings.bulk_suffix)
        #: Each model's last state, by its queue.
        self.states: dict[str, RouteState] = {}
        self.reclaim_grace_s = grace_for(settings.poll_ms / 1000)
        self._reclaim_offset = 0
        self._full = False
        # Half the route TTL, so a stand-by leads before the route expires; but never under a poll and a half,
        # or the lease would lapse between two renewals.
        self.lease = Lease(broker, self.gpu_queue, max(settings.route_ttl_s / 2, 1.5 * settings.poll_ms / 1000))
        self.leading: bool | None = None

    @property
    def state(self) -> RouteState | None:
        return self.states.get(self.gpu_queue)

    def _resume(self) -> dict[str, RouteState]:
        """Carry on from the states a previous watchdog left (a restart must not flip a route)."""
        raws = self.broker.client.mget([state_key(self.broker, m.queue) for m in self.models])
        return {m.queue: RouteState.decode(raw) if raw else
                RouteState(route=GPU, cpu_open=True, since=clock.now(), at=clock.now())
                for m, raw in zip(self.models, raws, strict=True)}

    def poll(self) -> RouteState | None:
        """Lead: measure, decide, write each model's state, log and record each change, and return the default
        model's new state. Stand by while another watchdog leads (the lease): return None."""
        leading = self.lease.hold()
        if leading != self.leading:
            if leading:
                logger.info("leading: this watchdog measures and writes the route")
            else:
                logger.info("standing by: watchdog %s leads", self.lease.leader())
            self.leading = leading
            metrics.LEADING.set(leading)
        if not leading:
            self.states = {}  # on taking over, carry on from the states the leader left
            return None
        # Bulk lanes are measured for the record, never judged: a bulk run waits its turn and sheds nothing.
        snapshot = measure(self.broker, self.queues, self.settings.poll_ms / 1000)
        self._reclaim([w for workers in snapshot.workers.values() for w in workers])
        previous = self.states or self._resume()
        gates = self._gates(previous, snapshot.loads)
        now = clock.now()
        changes: list[tuple[ServedModel, RouteState, RouteState]] = []
        for model in self.models:
            before, load = previous[model.queue], snapshot.loads[model.queue]
            route = SHED if self.model_marks[model.queue].overloaded(before.route == SHED, load) else GPU
            cpu_open = gates.get(model.fallback, False)
            changed = route != before.route or cpu_open != before.cpu_open
            fallback = snapshot.loads.get(model.fallback)
            reason = self._reason(model, route, cpu_open, load, fallback) if changed else before.reason
            self.states[model.queue] = RouteState(
                route=route, cpu_open=cpu_open, since=now if changed else before.since, at=now, reason=reason,
                loads=snapshot.loads, metrics_port=metrics.served_port, leader=self.lease.holder)
            if changed:
                changes.append((model, before, self.states[model.queue]))
        with self.broker.client.pipeline(transaction=False) as pipe:
            for model in self.models:
                pipe.set(state_key(self.broker, model.queue), self.states[model.queue].encode(),
                         px=int(self.settings.route_ttl_s * 1000))
            for model, _, state in changes:
                load, fallback = snapshot.loads[model.queue], snapshot.loads.get(model.fallback)
                pipe.xadd(changes_key(self.broker, model.queue),
                          {"route": state.route, "cpu_open": int(state.cpu_open), "at": now,
                           "gpu_backlog": load.backlog, "gpu_wait_s": str(load.wait_s),
                           "cpu_backlog": fallback.backlog if fallback else 0,
                           "cpu_wait_s": str(fallback.wait_s if fallback else None), "reason": state.reason},
                          maxlen=CHANGES_KEPT, approximate=True)
            # Counters producers and workers keep, re-exported as metrics (same round trip).
            for model in self.models:
                pipe.hgetall(counts_key(self.broker, model.queue))
            served = [m.queue for m in self.models] + self.models.fallbacks
            for queue in served:
                pipe.hgetall(model_loads_key(self.broker, queue))
            replies = pipe.execute()[len(self.models) + len(changes):]
        routed = dict(zip((m.name for m in self.models), replies[:len(self.models)], strict=True))
        self._export(changes, gates, routed, dict(zip(served, replies[len(self.models):], strict=True)))
        for model, before, state in changes:
            level = logging.WARNING if state.route == SHED else logging.INFO
            logger.log(level, "route %s%s/%s -> %s/%s: %s", _named(model, self.models), before.route,
                       _gate(before.cpu_open), state.route, _gate(state.cpu_open), state.reason)
        return self.state

    def _gates(self, previous: dict[str, RouteState], loads: dict[str, QueueLoad]) -> dict[str, bool]:
        """Whether each fast-ranker queue takes shed jobs, judged once for all the models that shed to it."""
        gates = {}
        for queue in self.models.fallbacks:
            was_open = next(previous[m.queue].cpu_open for m in self.models if m.fallback == queue)
            gates[queue] = not self.marks.overloaded(not was_open, loads[queue])
        return gates

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

    def _export(self, changes: list[tuple[ServedModel, RouteState, RouteState]], gates: dict[str, bool],
                routed: dict[str, dict[bytes, bytes]], loads: dict[str, dict[bytes, bytes]]) -> None:
        for model in self.models:
            metrics.ROUTE_SHED.labels(model.name).set(self.states[model.queue].route == SHED)
        for queue, is_open in gates.items():
            metrics.CPU_OPEN.labels(queue).set(is_open)
        for model, _, state in changes:
            metrics.ROUTE_CHANGES.labels(model.name, state.route).inc()
        assert self.state is not None
        metrics.record_loads(self.state.loads)
        metrics.REDIS_COUNTERS.routed = {(name, k.decode()): int(v)
                                         for name, counts in routed.items() for k, v in counts.items()}
        metrics.REDIS_COUNTERS.model_loads = {(queue, k.decode()): int(v)
                                              for queue, counts in loads.items() for k, v in counts.items()}

    def _reason(self, model: ServedModel, route: str, cpu_open: bool, load: QueueLoad,
                fallback: QueueLoad | None) -> str:
        to = model.queue if route == GPU else model.fallback if cpu_open else "passthrough"
        if route == SHED and not cpu_open and not self.settings.passthrough:
            to = f"{model.queue} (passthrough is off)"
        shed_to = f"; {fallback.describe()}" if fallback else "; no fast-ranker fallback"
        return f"{load.describe()}{shed_to} (marks: {self.model_marks[model.queue].describe()}); new jobs go to {to}"

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


def _named(model: ServedModel, models: Models) -> str:
    return f"of {model.name} " if len(models) > 1 else ""


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
    logger.info("watching %s every %.0f ms; marks: %s; route state TTL %.1fs",
                ", ".join(f"{m.name} on {m.queue} (shed to {m.fallback or 'passthrough'})" for m in watchdog.models),
                settings.poll_ms, watchdog.marks.describe(), settings.route_ttl_s)
    watchdog.run(stop)
    watchdog.lease.release()
    broker.close()
    logger.info("stopped; producers fall back to each model's queue within %.1fs", settings.route_ttl_s)
    return 0
