"""What each worker tells the watchdog: its throughput and the jobs it holds, refreshed every poll.

Each worker writes one field (its node name) of the hash ``rerankq:workers:<queue>`` for every queue it
serves. A worker counts as live while its figures are fresher than ``live_for(poll_s)``; the watchdog
turns the figures into an estimated wait (``tasks.router.QueueLoad``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rerankq.tasks import clock, memory
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker import inflight

logger = logging.getLogger(__name__)

#: Forward batches the throughput is averaged over. Idle time does not count: the rate is what a busy worker does.
WINDOW_BATCHES = 64
#: Seconds the busy ratio and the queue-wait p95 a worker reports are measured over.
RECENT_S = 30.0


def live_for(poll_s: float) -> float:
    """How old a worker's figures may be before it no longer counts as live."""
    return max(2.0, 5 * poll_s)


def grace_for(poll_s: float) -> float:
    """How long a worker may go unheard before the jobs it held count as orphaned: several reports' worth."""
    return max(10.0, 3 * live_for(poll_s))


def workers_key(broker: BrokerRedis, queue: str) -> str:
    return broker.key("workers", queue)


def model_loads_key(broker: BrokerRedis, queue: str) -> str:
    """A hash of model-load outcomes (``success``, ``failure``) of the workers of ``queue``."""
    return broker.key("model-loads", queue)


def count_model_load(broker: BrokerRedis, queues: list[str], outcome: str) -> None:
    with broker.client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.hincrby(model_loads_key(broker, queue), outcome, 1)
        pipe.execute()


class Throughput:
    """Pairs and jobs served over busy seconds, over the last ``WINDOW_BATCHES`` forward batches (thread-safe), in all
    and per queue (each lane is a queue: its jobs' size is what turns its backlog into a wait)."""

    def __init__(self) -> None:
        self._batches: deque[tuple[Mapping[str, int], Mapping[str, int], float]] = deque(maxlen=WINDOW_BATCHES)
        self._lock = threading.Lock()
        self.served = 0

    def add(self, pairs: Mapping[str, int], jobs: Mapping[str, int], busy_s: float) -> None:
        """One forward batch: its pairs and the jobs it finished per queue, and the seconds it took."""
        with self._lock:
            self._batches.append((pairs, jobs, busy_s))
            self.served += sum(jobs.values())

    def window(self) -> tuple[int, int, float, dict[str, list[int]]]:
        """Pairs, jobs and busy seconds over the window, and ``{queue: [pairs, jobs]}``."""
        with self._lock:
            batches = list(self._batches)
        per_queue: dict[str, list[int]] = {}
        for pairs, jobs, _ in batches:
            for queue in jobs:
                counts = per_queue.setdefault(queue, [0, 0])
                counts[0] += pairs.get(queue, 0)
                counts[1] += jobs[queue]
        return (sum(sum(c[0].values()) for c in batches), sum(sum(c[1].values()) for c in batches),
                sum(c[2] for c in batches), per_queue)


class Busy:
    """Seconds spent in forward batches over the last ``window_s`` (``now`` from a monotonic clock), a running
    sum: the runner asks before every batch."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._batches: deque[tuple[float, float]] = deque()
        self._seconds = 0.0

    def add(self, now: float, seconds: float) -> None:
        self._batches.append((now, seconds))
        self._seconds += seconds

    def seconds(self, now: float) -> float:
        while self._batches and self._batches[0][0] < now - self.window_s:
            self._seconds -= self._batches.popleft()[1]
        return self._seconds

    def ratio(self, now: float) -> float:
        """Share of the window spent in forward batches."""
        return self.seconds(now) / self.window_s


class Recent:
    """The model's busy seconds and the interactive jobs' queue waits over the last ``window_s``, for the
    worker's report: the write-up's utilisation and queue-wait p95 figures (thread-safe)."""

    def __init__(self, window_s: float = RECENT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._busy = Busy(window_s)
        self._waits: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._started = clock()

    def busy(self, seconds: float) -> None:
        with self._lock:
            self._busy.add(self._clock(), seconds)

    def waited(self, seconds: float) -> None:
        with self._lock:
            self._waits.append((self._clock(), seconds))

    def _trim(self, now: float) -> None:
        while self._waits and self._waits[0][0] < now - self.window_s:
            self._waits.popleft()

    def busy_ratio(self) -> float:
        """Share of the window (or of the time since start, if shorter) spent in forward batches."""
        now = self._clock()
        with self._lock:
            busy = self._busy.seconds(now)
        return min(1.0, busy / max(1e-9, min(self.window_s, now - self._started)))

    def wait_p95_ms(self) -> float | None:
        with self._lock:
            self._trim(self._clock())
            waits = sorted(seconds for _, seconds in self._waits)
        return round(1000 * waits[min(len(waits) - 1, int(0.95 * len(waits)))], 3) if waits else None


@dataclass(frozen=True)
class WorkerStats:
    node: str
    ranker: str
    model: str
    device: str
    #: Jobs this worker holds (received, not yet acked), per queue they came from.
    held: dict[str, int]
    #: Totals over the throughput window.
    pairs: int
    jobs: int
    busy_s: float
    served: int
    at: float = field(default_factory=clock.now)
    #: Delivery tags of the jobs it holds.
    tags: list[str] = field(default_factory=list)
    #: Over the throughput window, per queue (lane) it served: [pairs, jobs].
    per_queue: dict[str, list[int]] = field(default_factory=dict)
    #: Over the last ``RECENT_S``: share of wall time in forward batches; interactive queue-wait p95.
    busy_ratio: float = 0.0
    wait_p95_ms: float | None = None
    #: Where it serves /metrics on its host (0: nowhere).
    metrics_port: int = 0

    @property
    def pairs_per_s(self) -> float | None:
        return self.pairs / self.busy_s if self.busy_s > 0 else None

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> WorkerStats:
        return cls(**json.loads(raw))


class StatsReporter:
    """A daemon thread writing this worker's figures every ``interval_s``; removes them on ``stop``."""

    def __init__(self, broker: BrokerRedis, queues: Callable[[], list[str]], snapshot: Callable[[], WorkerStats],
                 interval_s: float) -> None:
        self._broker = broker
        self._queues = queues
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name="rerankq-stats", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.report()
                self._failing = False
            except Exception as exc:  # Redis away: the watchdog sees this worker as gone until it is back
                if not self._failing:
                    logger.warning("could not report worker figures to Redis: %r", exc)
                self._failing = True

    def report(self) -> None:
        clock.sync(lambda: self._broker.client)
        stats = self._snapshot()
        raw = stats.encode()
        keep_s = max(60, int(10 * live_for(self._interval_s)))
        # Overwrites what it wrote last time, so a full Redis still takes it: the worker stays live to the others.
        commands: list[tuple[Any, ...]] = []
        for queue in self._queues():
            commands += [("HSET", workers_key(self._broker, queue), stats.node, raw),
                         ("EXPIRE", workers_key(self._broker, queue), keep_s)]
        memory.run_atomically(self._broker.client, commands + inflight.beats(self._broker.prefix))
        # Every live worker does this, so a dead worker's jobs in transit come back with or without a watchdog.
        moved = inflight.reclaim(self._broker.client, self._broker.prefix, grace_for(self._interval_s))
        if moved:
            logger.warning("put back %d job(s) a dead worker left in flight", moved)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        try:
            node = self._snapshot().node
            with self._broker.client.pipeline(transaction=False) as pipe:
                for queue in self._queues():
                    pipe.hdel(workers_key(self._broker, queue), node)
                pipe.execute()
        except Exception:
            logger.warning("could not remove this worker's figures from Redis; they age out", exc_info=True)
