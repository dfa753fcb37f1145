"""Prometheus metrics: what a worker and the watchdog export, each on its own port (``RERANKQ_METRICS_PORT``).

A worker records its forward batches and jobs as they are served; the watchdog sets the route and queue figures it
measures every poll, and re-exports the counters that producers and workers keep in Redis (jobs routed
per destination, model loads per outcome), so that one scrape target covers the whole fleet. The names
and their meaning are in the README's *Metrics* table.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

_POW2 = [float(2**i) for i in range(0, 17)]
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# -- worker -----------------------------------------------------------------------------------------
BATCH_JOBS = Histogram("rerankq_forward_batch_jobs", "Jobs with pairs in a forward batch.", buckets=_POW2[:10])
BATCH_PAIRS = Histogram("rerankq_forward_batch_pairs", "Pairs per forward batch (one call of the model).",
                        buckets=_POW2[:13])
BATCH_PADDED = Histogram("rerankq_forward_batch_padded_tokens", "Padded tokens per forward batch.",
                         buckets=_POW2[4:])
BUSY = Counter("rerankq_busy_seconds", "Seconds from launching each forward batch to its scores read, the runner's "
               "own work between batches left out: its rate is the share of wall time the model is busy. On a GPU "
               "it counts the launches and the copy back too: rerankq_gpu_seconds is the device's own time.")
DEVICE_BUSY = Counter("rerankq_gpu_seconds", "Seconds the GPU spent in forward batches, timed on it by CUDA events "
                      "(GPU workers only): its rate is the share of wall time the GPU computes for this worker.")
REAL_TOKENS = Counter("rerankq_real_tokens", "Tokens of the pairs scored (before padding).")
PADDED_TOKENS = Counter("rerankq_padded_tokens",
                        "Tokens the forward batches ran, padding included: real / padded is padding efficiency.")
INFERENCE = Histogram("rerankq_inference_seconds", "From a job's first forward batch starting to its last pair "
                      "scored.", buckets=_SECONDS)
QUEUE_WAIT = Histogram("rerankq_queue_wait_seconds", "From the producer's send to the job's first forward batch, "
                       "by lane (interactive, bulk).", ["lane"], buckets=_SECONDS)
LATENCY = Histogram("rerankq_job_latency_seconds", "From the producer's send to the job's result being written, "
                    "by lane.", ["lane"], buckets=_SECONDS)
JOBS = Counter("rerankq_jobs", "Jobs settled, by outcome: success or the error's name.", ["outcome"])
DROPPED = Counter("rerankq_messages_dropped", "Items taken off a queue that could not become a rerank job, "
                  "dropped (removed, logged): by queue and reason (worker/dropped.py).", ["queue", "reason"])
CANCELLED = Counter("rerankq_jobs_cancelled", "Jobs dropped unscored because their caller had gone (revoked: an "
                    "HTTP client that disconnected, an arerank cancelled).")
HELD = Gauge("rerankq_jobs_held", "Jobs this worker holds: received, not yet acked.")
MODEL = Gauge("rerankq_model_info", "The model this worker serves (always 1).", ["ranker", "model", "device"])
MODEL_LOAD = Gauge("rerankq_model_load_seconds", "How long loading the model took.")
REDIS_FULL = Gauge("rerankq_redis_full", "1 while Redis is full (maxmemory reached under noeviction) and "
                   "refuses new jobs and results.")

# -- watchdog ---------------------------------------------------------------------------------------
LEADING = Gauge("rerankq_watchdog_leading", "1 while this watchdog leads (writes the route); 0 standing by.")
ROUTE_SHED = Gauge("rerankq_route_shed", "1 while new jobs are shed off the model's queue.", ["model"])
CPU_OPEN = Gauge("rerankq_cpu_queue_open", "1 while the fast-ranker queue takes shed jobs; 0 means passthrough.",
                 ["queue"])
ROUTE_CHANGES = Counter("rerankq_route_changes", "Route changes this watchdog made, by model and new route.",
                        ["model", "route"])
BACKLOG = Gauge("rerankq_backlog_jobs", "Jobs waiting in Redis plus held by live workers.", ["queue"])
WAIT = Gauge("rerankq_estimated_wait_seconds", "Backlog over throughput (+Inf with no live worker).", ["queue"])
WORKERS = Gauge("rerankq_live_workers", "Workers reporting figures.", ["queue"])
RECLAIMED = Counter("rerankq_jobs_reclaimed", "Jobs put back on their queue because no live worker held them.")
THROUGHPUT = Gauge("rerankq_throughput_pairs_per_second", "Sum over live workers, while busy.", ["queue"])
REDIS_MEMORY = Gauge("rerankq_redis_memory_bytes", "The broker Redis's memory: used, and its maxmemory limit (0: "
                     "none).", ["kind"])


class RedisCounters(Collector):
    """Counters kept in Redis hashes by other processes, exported as the watchdog last read them."""

    def __init__(self) -> None:
        #: Jobs routed, by served model and destination.
        self.routed: dict[tuple[str, str], int] = {}
        self.model_loads: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterable[CounterMetricFamily]:
        routed = CounterMetricFamily("rerankq_routed_jobs", "Jobs producers sent, by model and destination: the "
                                     "model's queue, the fast ranker's (rerouted) or passthrough.",
                                     labels=["model", "destination"])
        for (model, destination), n in sorted(self.routed.items()):
            routed.add_metric([model, destination], n)
        loads = CounterMetricFamily("rerankq_model_loads", "Worker model loads, by queue and outcome "
                                    "(success, failure).", labels=["queue", "outcome"])
        for (queue, outcome), n in sorted(self.model_loads.items()):
            loads.add_metric([queue, outcome], n)
        return [routed, loads]


REDIS_COUNTERS = RedisCounters()
REGISTRY.register(REDIS_COUNTERS)


#: Ports past its first one a process tries before it serves without metrics.
PORT_TRIES = 10
#: Where each kind of process starts, above ``RERANKQ_METRICS_PORT``: cross-encoder workers at it, the fast
#: ranker 10 above, the watchdog 20 above, so that the README's commands run side by side on one host.
KIND_OFFSETS = {"fast": 10, "watchdog": 20}
#: The port this process serves ``/metrics`` on (0: none), for its reports and ``rerankq status``.
served_port = 0
served_address = "127.0.0.1"


def default_port(kind: str, configured: int) -> int:
    """The first port a process of ``kind`` tries when none is given (``configured`` 0 means none)."""
    return configured + KIND_OFFSETS.get(kind, 0) if configured else 0


#: The path a probe asks whether this process serves (``READY``, and no work stalled: ``WORK``).
HEALTHZ = "/healthz"
#: Set once the process serves (a worker: its model loaded and warmed up, its consumer starting): ``/healthz`` on
#: the metrics port answers 200 from then on, 503 before (a Kubernetes startup probe's long model load).
READY = threading.Event()
#: A forward batch (or a watchdog's poll) running longer than this is stuck: a GPU sync that never returns.
STALL_S = 300.0
#: Connections the metrics server serves at once; each must send its request within ``REQUEST_S``.
MAX_CONNECTIONS, REQUEST_S = 16, 5.0


class Work:
    """The work in progress of the one thread that does this process's work (the runner, the watchdog's loop):
    it calls ``begin`` and ``end``; ``/healthz`` (another thread) asks ``stalled``. Idle is never stalled."""

    def __init__(self, limit_s: float = STALL_S) -> None:
        self.limit_s = limit_s
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.monotonic()

    def end(self) -> None:
        self._since = None

    def stalled(self) -> bool:
        since = self._since
        return since is not None and time.monotonic() - since > self.limit_s


WORK = Work()


def _with_healthz(metrics_app: Any) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != HEALTHZ:
            return metrics_app(environ, start_response)
        stalled = WORK.stalled()
        ok = READY.is_set() and not stalled
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"stalled\n" if stalled else b"starting\n"]
    return app


class _Server(ThreadingWSGIServer):
    """At most ``MAX_CONNECTIONS`` at once, each with ``REQUEST_S`` to send its request: idle connections cannot
    pile up threads until the probes fail (the handler's timeout closes them; more are refused)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_S

    def log_message(self, format: str, *args: Any) -> None:  # a scrape or a probe every few seconds: no log line
        pass


def serve(port: int, address: str = "127.0.0.1") -> int:
    """Expose ``/metrics`` (and ``/healthz``, see ``READY``) on ``port`` of ``address`` (RERANKQ_METRICS_ADDRESS), or
    on the next free one of ``PORT_TRIES``; 0 means no metrics. Returns the port served, 0 if every one was taken: a
    port in use never keeps a process from serving jobs. The caller says where metrics are."""
    global served_port, served_address
    app = _with_healthz(make_wsgi_app(REGISTRY))
    for candidate in range(port, min(65536, port + PORT_TRIES)) if port else ():
        try:
            family = socket.getaddrinfo(address, candidate, type=socket.SOCK_STREAM)[0][0]
            server_class = type("_MetricsServer", (_Server,), {"address_family": family})
            server: _Server = make_server(address, candidate, app, server_class, handler_class=_Quiet)
        except OSError:
            continue
        threading.Thread(target=server.serve_forever, name="rerankq-metrics", daemon=True).start()
        served_port, served_address = candidate, address
        return candidate
    return 0


def describe(asked: int, served: int) -> str:
    """One line for the log: where metrics are, and why not where asked."""
    if not asked:
        return "no metrics (port 0)"
    if not served:
        return (f"no metrics: ports {asked}-{asked + PORT_TRIES - 1} are all in use (give this process its own "
                "--metrics-port or RERANKQ_METRICS_PORT)")
    moved = f" (port {asked} is in use)" if served != asked else ""
    return f"metrics on http://{served_address}:{served}/metrics{moved}"


def record_loads(loads: Mapping[str, Any]) -> None:
    """The watchdog's measured loads (``QueueLoad`` per queue)."""
    for queue, load in loads.items():
        BACKLOG.labels(queue).set(load.backlog)
        WAIT.labels(queue).set(math.nan if load.wait_s is None else load.wait_s)  # NaN: no throughput yet
        WORKERS.labels(queue).set(load.workers)
        THROUGHPUT.labels(queue).set(load.pairs_per_s or 0.0)


def install_gpu_collector(device: str) -> None:
    """GPU memory (read at scrape time) and utilisation (sampled), on CUDA workers (not a simulated GPU)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        REGISTRY.register(GpuCollector())


#: How often the NVML utilisation is sampled: it covers the last 1/6 to 1 s, depending on the GPU.
SAMPLE_S = 0.5


class Sampled:
    """The mean of the samples taken since it was last read, or the last sample if none came since: one NVML
    reading at scrape time said what the GPU did in the second before a 15 s scrape, not over it. The sampling
    thread adds, the scrape takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum, self._count = 0.0, 0
        self._last: float | None = None

    def add(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            self._last = value

    def take(self) -> float | None:
        with self._lock:
            mean = self._sum / self._count if self._count else self._last
            self._sum, self._count = 0.0, 0
            return mean


class GpuCollector(Collector):
    def __init__(self) -> None:
        self.utilization = Sampled()
        threading.Thread(target=self._sample, name="rerankq-nvml", daemon=True).start()

    def _sample(self) -> None:
        import torch

        while True:
            try:  # needs NVML (the nvidia-ml-py package); a MIG instance has no utilisation of its own
                self.utilization.add(torch.cuda.utilization() / 100)
            except Exception:
                return
            time.sleep(SAMPLE_S)

    def describe(self) -> list[Any]:
        """The families ``collect`` gives, without values (what a CPU-only process can list)."""
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily("rerankq_gpu_memory_bytes", "GPU memory held by this worker.", labels=["kind"]),
                GaugeMetricFamily("rerankq_gpu_memory_total_bytes", "The GPU's memory."),
                GaugeMetricFamily("rerankq_gpu_utilization_ratio", "Share of time the GPU ran a kernel (NVML), the "
                                  "mean of samples every 0.5 s since the last scrape; any process's kernels count.")]

    def collect(self) -> Iterable[Any]:
        import torch

        memory, total, busy = self.describe()
        memory.add_metric(["allocated"], torch.cuda.memory_allocated())
        memory.add_metric(["reserved"], torch.cuda.memory_reserved())
        total.add_metric([], torch.cuda.get_device_properties(0).total_memory)
        utilization = self.utilization.take()
        if utilization is None:
            return [memory, total]
        busy.add_metric([], utilization)
        return [memory, total, busy]
