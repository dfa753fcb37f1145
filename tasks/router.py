"""The router: which queue a new job goes to, from the route state the watchdog keeps in Redis.

The watchdog (``worker/watchdog.py``) writes one ``RouteState`` with a TTL and refreshes it every poll.
Producers read it at most once per ``RERANKQ_ROUTE_CACHE_MS``, never once per job:

* no state (no watchdog, or it died and the TTL ran out), or ``gpu``: the GPU queue;
* ``shed`` while the CPU queue is open: the CPU queue (the fast ranker);
* ``shed`` while the CPU queue is closed too: passthrough, the retrieval order at once (if enabled).

Jobs already queued stay where they are; only new jobs follow the route.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.records import Job, Result, Timings

logger = logging.getLogger(__name__)

GPU, SHED = "gpu", "shed"
#: What ``Router.route`` returns for a job that must not be queued.
PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class QueueLoad:
    """One queue's backlog as the watchdog measured it."""

    queue: str
    #: Messages in the queue's Redis lists (every priority).
    waiting: int
    #: Jobs live workers hold prefetched and not yet acked.
    held: int
    workers: int
    #: Throughput the queue's live workers reported (sum over workers), or None before any forward batch ran.
    pairs_per_s: float | None
    pairs_per_job: float | None

    @property
    def backlog(self) -> int:
        return self.waiting + self.held

    @property
    def wait_s(self) -> float | None:
        """Estimated wait of a new job: infinite with no live worker, None while throughput is unknown."""
        if self.workers == 0:
            return float("inf")
        if not self.pairs_per_s or self.pairs_per_job is None:
            return None
        return self.backlog * self.pairs_per_job / self.pairs_per_s

    def describe(self) -> str:
        wait = self.wait_s
        shown = "unknown" if wait is None else "no live worker" if wait == float("inf") else f"{wait:.2f}s"
        return (f"{self.queue}: backlog {self.backlog} ({self.waiting} waiting, {self.held} held), "
                f"{self.workers} live worker{'' if self.workers == 1 else 's'}, est. wait {shown}")


@dataclass(frozen=True)
class RouteState:
    route: str
    cpu_open: bool
    #: When the route last changed, and when this state was written (Unix seconds).
    since: float
    at: float
    reason: str = ""
    loads: dict[str, QueueLoad] = field(default_factory=dict)
    #: Where the watchdog serves /metrics on its host (0: nowhere), and which watchdog leads.
    metrics_port: int = 0
    leader: str = ""

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> RouteState:
        data = json.loads(raw)
        loads = {name: QueueLoad(**load) for name, load in data.pop("loads", {}).items()}
        return cls(**data, loads=loads)


def state_key(broker: BrokerRedis, gpu_queue: str) -> str:
    return broker.key("route", gpu_queue)


def counts_key(broker: BrokerRedis, gpu_queue: str) -> str:
    return broker.key("routed", gpu_queue)


def changes_key(broker: BrokerRedis, gpu_queue: str) -> str:
    return broker.key("route-changes", gpu_queue)


class Router:
    """Picks a queue per job from the cached route state; counts where jobs went.

    Counts are added to Redis (``rerankq:routed:<gpu queue>``, shown by ``rerankq status``) on the round
    trip of the next refresh; ``counts`` holds this process's own.
    Redis being unreachable routes to the GPU queue: the send itself then fails or retries as usual.
    """

    def __init__(self, broker: Callable[[], BrokerRedis], gpu_queue: str, cpu_queue: str, cache_s: float,
                 passthrough: bool) -> None:
        self._connect = broker
        self._broker: BrokerRedis | None = None
        self.gpu_queue = gpu_queue
        self.cpu_queue = cpu_queue
        self.cache_s = cache_s
        self.passthrough = passthrough
        self.counts: Counter[str] = Counter()
        self._unsent: Counter[str] = Counter()
        self._state: RouteState | None = None
        self._fetched = float("-inf")
        self._failing = False
        self._lock = threading.Lock()

    def route(self) -> str:
        """The queue for a new job, or ``PASSTHROUGH``."""
        state = self.state()
        if state is None or state.route != SHED:
            choice = self.gpu_queue
        elif state.cpu_open and self.cpu_queue:  # a model with no fast-ranker fallback has no CPU queue
            choice = self.cpu_queue
        else:
            choice = PASSTHROUGH if self.passthrough else self.gpu_queue
        self.counts[choice] += 1
        self._unsent[choice] += 1
        if choice == PASSTHROUGH and self._unsent[choice] == 1:  # at most one line per refresh
            logger.warning("passthrough: %s and %s are both over their marks; this job (and any more until the "
                           "next refresh) gets its retrieval order back", self.gpu_queue, self.cpu_queue)
        return choice

    def state(self) -> RouteState | None:
        """The route state as last read (refreshed when older than the cache), counting nothing."""
        if time.monotonic() - self._fetched >= self.cache_s and self._lock.acquire(blocking=False):
            try:
                self._refresh()
            finally:
                self._lock.release()
        return self._state

    def _refresh(self) -> None:
        self._fetched = time.monotonic()
        unsent, self._unsent = self._unsent, Counter()
        try:
            if self._broker is None:
                self._broker = self._connect()
            broker = self._broker
            with broker.client.pipeline(transaction=False) as pipe:
                pipe.get(state_key(broker, self.gpu_queue))
                for choice, n in unsent.items():
                    pipe.hincrby(counts_key(broker, self.gpu_queue), choice, n)
                # A full Redis refuses the counts (they are lost), not the read.
                raw = pipe.execute(raise_on_error=False)[0]
            if isinstance(raw, Exception):
                raise raw
        except Exception as exc:  # fail safe: the GPU queue, as if no watchdog ran
            if not self._failing:
                logger.warning("could not read the route state (%r); routing to %s until it can",
                               exc, self.gpu_queue)
            self._failing = True
            self._state = None
            return
        self._failing = False
        self._state = RouteState.decode(raw) if raw else None


def passthrough_result(args: Any, kwargs: Mapping[str, Any], max_docs: int, max_query_chars: int | None = None
                       ) -> Result:
    """The docs in the order they came, scores decreasing by position; ``BadJob`` for malformed input."""
    job = Job.from_call(args or (), kwargs or {}, max_docs, max_query_chars)
    n = len(job.docs)
    scores = [1.0 - i / n for i in range(n)]
    return Result(scores=scores, ranker=PASSTHROUGH, model="retrieval-order", timings=Timings(0.0, 0.0),
                  top=list(range(min(job.top_k, n))) if job.top_k else None)
