"""``GET /health``: does Redis answer, and does a live worker serve the queue new jobs go to, for each served
model? The answer is the default model's (503 only when it has none), ``models`` each one's.

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
from rerankq.server.schemas import Health, ModelHealth
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.memory import Memory, memory
from rerankq.tasks.models import ServedModel
from rerankq.tasks.router import GPU, SHED, RouteState, state_key
from rerankq.worker.backlog import measure


def judge(route: RouteState | None, workers: dict[str, int], settings: Settings,
          full: Memory | None = None, model: ServedModel | None = None) -> Health:
    """The health verdict of ``model`` (default: the default model) from what Redis holds: pure, so every case
    is a unit test. ``full``: Redis's memory when it is full."""
    model = model or settings.served.default
    gpu, cpu = model.queue, model.fallback
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
    start = "rerankq worker" + ("" if model == settings.served.default else f" --model {model.name}")
    return Health(status="unavailable", reason=f"no live worker serves {gpu}: start `{start}` (or check `rerankq "
                  "status`)", route=shown, workers=workers)


def overall(default: Health, others: dict[str, tuple[str, Health]]) -> Health:
    """The verdict ``/health`` answers: the default model's (503 only when it is unavailable), degraded when it is
    ok and another served model is not; ``models`` holds each one's own. ``others``: every served model's
    queue and verdict, by name (the default's too)."""
    verdicts = {name: ModelHealth(status=h.status, reason=h.reason, route=h.route, queue=queue)
                for name, (queue, h) in others.items()}
    bad = [f"{name}: {v.reason}" for name, v in verdicts.items() if v.status != "ok"]
    if default.status == "ok" and bad:
        return default.model_copy(update={"status": "degraded", "reason": f"{default.reason}; but " + "; ".join(bad),
                                          "models": verdicts})
    return default.model_copy(update={"models": verdicts})


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
        served = settings.served
        queues = [*(m.queue for m in served), *served.fallbacks]
        snapshot = measure(broker, queues, settings.poll_ms / 1000)
        raws = broker.client.mget([state_key(broker, m.queue) for m in served])
        workers = {queue: len(snapshot.workers[queue]) for queue in queues}
        usage = memory(broker.client)
        full = usage if usage.full else None
        verdicts = {m.name: (m.queue, judge(RouteState.decode(raw) if raw else None, workers, settings, full, m))
                    for m, raw in zip(served, raws, strict=True)}
        return overall(verdicts[served.default.name][1], verdicts)
