"""``GET /health``: does Redis answer, and does a live worker serve the queue new jobs go to?

The probe is two round trips (the queues' lengths and the worker figures, as the watchdog measures them,
figures of workers long gone removed on the way; then the route state), run off the event loop. At most
one runs at a time, and its answer serves every request for ``cache_s``: a load balancer polling many times
a second costs Redis one probe per interval, and a Redis gone silent holds one thread for one socket
timeout (``RERANKQ_SOCKET_TIMEOUT_S``), not one per poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from rerankq.celeryconfig import Settings
from rerankq.server.schemas import Health
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.memory import Memory, memory
from rerankq.tasks.router import GPU, SHED, RouteState, state_key
from rerankq.worker.backlog import measure


def judge(route: RouteState | None, workers: dict[str, int], settings: Settings,
          full: Memory | None = None) -> Health:
    """The health verdict from what Redis holds: pure, so every case is a unit test. ``full``: Redis's memory
    when it is full."""
    gpu, cpu = settings.gpu_queue, settings.cpu_queue
    shown = route.route if route else GPU
    if full is not None:
        return Health(status="unavailable", reason=f"Redis is full ({full.describe()}): new jobs are refused "
                      "until workers drain the queues or maxmemory is raised", route=shown, workers=workers)
    shedding = route is not None and route.route == SHED
    if shedding and settings.serve_overload == "reject":
        if workers.get(gpu):
            return Health(status="degraded", reason=f"{gpu} is over its marks: answering 429 "
                          "(RERANKQ_SERVE_OVERLOAD=reject)", route=shown, workers=workers)
        return Health(status="unavailable", reason=f"no live worker serves {gpu}, and this server answers 429 "
                      "instead of degrading (RERANKQ_SERVE_OVERLOAD=reject)", route=shown, workers=workers)
    if shedding and route is not None and route.cpu_open:
        if workers.get(cpu):
            return Health(status="degraded", reason=f"{gpu} is over its marks: answering from the fast ranker "
                          f"on {cpu}", route=shown, workers=workers)
        return Health(status="unavailable", reason=f"shedding to {cpu}, which no live worker serves",
                      route=shown, workers=workers)
    if shedding and settings.passthrough:
        if workers.get(gpu):  # overloaded, not gone
            return Health(status="degraded", reason="both queues are over their marks: answering in retrieval "
                          "order (passthrough)", route=shown, workers=workers)
        return Health(status="unavailable", reason=f"no live worker serves {gpu} or {cpu}: answering in retrieval "
                      "order (passthrough) until one does", route=shown, workers=workers)
    if workers.get(gpu):  # not shedding, or shedding with passthrough off: jobs go to the GPU queue
        return Health(status="ok", reason=f"{workers[gpu]} live worker(s) on {gpu}", route=shown, workers=workers)
    return Health(status="unavailable", reason=f"no live worker serves {gpu}: start `rerankq worker` (or "
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
        usage = memory(broker.client)
        return judge(route, workers, settings, usage if usage.full else None)
