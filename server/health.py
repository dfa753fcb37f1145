"""``GET /health``: does Redis answer, and does a live worker serve the queue new jobs go to?

The probe is one pipelined round trip (the queues' lengths, the worker figures, the route state), run off
the event loop. At most one runs at a time, and its answer serves every request for ``cache_s``: a load
balancer polling many times a second costs Redis one round trip per interval, and a hung Redis holds one
thread, not one per poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from celeryconfig import Settings
from server.schemas import Health
from tasks.connections import BrokerRedis
from tasks.router import GPU, SHED, RouteState, state_key
from worker.backlog import measure


def judge(route: RouteState | None, workers: dict[str, int], gpu_queue: str, cpu_queue: str) -> Health:
    """The health verdict from what Redis holds: pure, so every case is a unit test."""
    shown = route.route if route else GPU
    if route is not None and route.route == SHED:
        if not route.cpu_open:
            return Health(status="degraded", reason="both queues are over their marks: answering in retrieval "
                          "order (passthrough)", route=shown, workers=workers)
        if workers.get(cpu_queue):
            return Health(status="degraded", reason=f"{gpu_queue} is over its marks: answering from the fast "
                          f"ranker on {cpu_queue}", route=shown, workers=workers)
        return Health(status="unavailable", reason=f"shedding to {cpu_queue}, which no live worker serves",
                      route=shown, workers=workers)
    if workers.get(gpu_queue):
        return Health(status="ok", reason=f"{workers[gpu_queue]} live worker(s) on {gpu_queue}", route=shown,
                      workers=workers)
    return Health(status="unavailable", reason=f"no live worker serves {gpu_queue}: start `rerankq worker` (or "
                  "check `rerankq status`)", route=shown, workers=workers)


class HealthProbe:
    def __init__(self, settings: Settings, broker: Callable[[], BrokerRedis], timeout_s: float = 2.0,
                 cache_s: float = 0.5) -> None:
        self._settings, self._broker = settings, broker
        self._timeout_s, self._cache_s = timeout_s, cache_s
        self._last: tuple[float, Health] | None = None
        self._reading: asyncio.Future[Health] | None = None

    async def check(self) -> Health:
        if self._last is not None and time.monotonic() - self._last[0] < self._cache_s:
            return self._last[1]
        if self._reading is None or self._reading.done():  # a read stuck on a hung Redis is not doubled
            self._reading = asyncio.get_running_loop().run_in_executor(None, self._read)
        try:
            health = await asyncio.wait_for(asyncio.shield(self._reading), self._timeout_s)
        except asyncio.TimeoutError:
            health = self._unavailable(f"Redis did not answer within {self._timeout_s:g}s")
        except Exception as exc:
            health = self._unavailable(f"Redis does not answer ({type(exc).__name__}: {exc})")
        self._last = (time.monotonic(), health)
        return health

    def _unavailable(self, reason: str) -> Health:
        return Health(status="unavailable", reason=f"{reason}: is Redis up, and RERANKQ_BROKER_URL right?",
                      route="unknown", workers={})

    def _read(self) -> Health:
        settings = self._settings
        broker = self._broker()
        queues = [settings.gpu_queue, settings.cpu_queue]
        snapshot = measure(broker, queues, settings.poll_ms / 1000)
        raw = broker.client.get(state_key(broker, settings.gpu_queue))
        route = RouteState.decode(raw) if raw else None
        workers = {queue: len(snapshot.workers[queue]) for queue in queues}
        return judge(route, workers, settings.gpu_queue, settings.cpu_queue)
