"""``rerankq worker``: pin the device, load the model once, then serve the queue with the chunk consumer."""

from __future__ import annotations

import os
import sys
import time


def run_worker(queues: list[str], ranker: str, device: str, model: str, served_name: str, loglevel: str,
               hostname: str | None, metrics_port: int, instruction: str = "") -> int:
    """``model``: what to load (a hub id or path; empty: the settings' default for ``ranker``); ``served_name``:
    what its answers say scored them (tasks/models.py; empty: ``model`` itself); ``instruction``: an LLM
    reranker's default."""
    from rerankq.celeryconfig import settings
    from rerankq.tasks import tracing
    from rerankq.tasks.errors import RerankError
    from rerankq.worker import device as pinning
    from rerankq.worker.upstream import surface

    try:
        surface.check()  # a kombu or Celery that moved fails here, by name, not in the middle of a receive
        tracing.setup(settings.tracing, f"rerankq-worker-{ranker}")
        torch_device = pinning.pin(device)
        # Only now may torch load: CUDA_VISIBLE_DEVICES is set.
        from rerankq.worker import metrics

        served = metrics.serve(metrics_port, settings.metrics_address)
        print(f"rerankq worker: {metrics.describe(metrics_port, served)}", file=sys.stderr, flush=True)
    except RerankError as exc:
        print(f"rerankq worker: {exc}", file=sys.stderr, flush=True)
        return 1

    from celery.utils.nodenames import host_format

    from rerankq.tasks import app, lanes
    from rerankq.worker.dtype import for_device
    from rerankq.worker.model import warm_up
    from rerankq.worker.rankers import is_device_lost, is_llm, load_ranker
    from rerankq.worker.runner import DEVICE_LOST_EXIT, device_lost
    from rerankq.worker.upstream import transport

    node = host_format(hostname or f"rerankq-{ranker}-{device.replace(':', '')}-{os.getpid()}@%h")
    # rerankq's receive, chosen by class for this app in this process only (worker/upstream/transport.py); the
    # app's connections keep it when they move to the next URL (tasks/sentinel.py).
    app.conf.broker_url, app.conf.broker_transport = transport.for_url(app.conf.broker_url)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         **transport.options(owner=node, bulk_limit=settings.bulk_limit)}

    name = model or (settings.fast_model if ranker == "fast" else settings.model if ranker != "simulated" else "")
    if ranker == "cross-encoder" and is_llm(name):  # known before its dtype is chosen
        ranker = "llm"
    onnx = ranker == "cross-encoder" and settings.backend != "torch"
    started = time.monotonic()
    try:
        dtype, why = ("fp32", "") if onnx or ranker == "simulated" else for_device(settings.dtype, torch_device,
                                                                                   ranker == "llm")
        print(f"rerankq worker: loading the {ranker} model {name or 'all-MiniLM-L6-v2 (bundled)'!r} on {device}"
              + (f" ({settings.backend})" if onnx else f" in {dtype} ({why})" if why else ""),
              file=sys.stderr, flush=True)
        loaded = load_ranker(ranker, name, torch_device, settings.max_length, settings.backend, dtype, instruction)
    except RerankError as exc:
        _count_load(app, queues, "failure")
        print(f"rerankq worker: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics.MODEL_LOAD.set(time.monotonic() - started)  # the load alone, not the warm-up after it
    if served_name and served_name != loaded.model:
        print(f"rerankq worker: serving it as {served_name!r} on {', '.join(queues)}", file=sys.stderr, flush=True)
        loaded.model = served_name
    try:
        took = warm_up(loaded)
        fits = f"; forward batches of up to {loaded.fits_tokens} padded tokens fit in its memory" \
            if loaded.fits_tokens else ""
        print(f"rerankq worker: warmed up in {1000 * took:.0f} ms{fits}", file=sys.stderr, flush=True)
    except Exception as exc:  # each job's own forward says the rest (RankerFailed)
        print(f"rerankq worker: the model loaded but failed a warm-up forward batch: {exc!r}", file=sys.stderr,
              flush=True)
        if is_device_lost(exc):  # a GPU broken before any job: taking jobs would only fail them
            return DEVICE_LOST_EXIT
    metrics.MODEL.labels(loaded.kind, loaded.model, device).set(1)
    metrics.install_gpu_collector(torch_device)
    _count_load(app, queues, "success")

    from rerankq.worker.consumer import ChunkStep, install
    from rerankq.worker.upstream.patches import survive_redis_outage

    survive_redis_outage()
    install(loaded, device)
    metrics.READY.set()  # /healthz: the model is loaded and warm; the consumer starts next
    app.steps["consumer"].add(ChunkStep)
    # Each queue's two lanes: interactive jobs are received and scored first, bulk jobs fill the rest.
    worker = app.Worker(hostname=node, pool_cls="solo", concurrency=1, queues=lanes.both(queues), loglevel=loglevel,
                        without_gossip=True, without_mingle=True, task_events=True)
    worker.start()
    if device_lost.is_set():
        print("rerankq worker: the GPU failed for good; exiting to be restarted", file=sys.stderr, flush=True)
        return DEVICE_LOST_EXIT
    return int(worker.exitcode or 0)


def _count_load(app: object, queues: list[str], outcome: str) -> None:
    """Add this load's outcome to Redis, where the watchdog exports the fleet's model-load success rate."""
    from rerankq.tasks.connections import BrokerRedis
    from rerankq.worker.stats import count_model_load

    try:
        broker = BrokerRedis(app)
        try:
            count_model_load(broker, queues, outcome)
        finally:
            broker.close()
    except Exception as exc:
        print(f"rerankq worker: could not count this model load in Redis: {exc!r}", file=sys.stderr, flush=True)
