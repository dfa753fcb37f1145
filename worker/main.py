"""``rerankq worker``: pin the device, load the model once, then serve the queue with the chunk consumer."""

from __future__ import annotations

import os
import sys


def run_worker(queues: list[str], ranker: str, device: str, model: str, loglevel: str,
               hostname: str | None) -> int:
    from celeryconfig import settings
    from tasks.errors import RerankError
    from worker import device as pinning

    try:
        torch_device = pinning.pin(device)
        # Only now may torch load: CUDA_VISIBLE_DEVICES is set.
        from worker.rankers import load_ranker

        name = model or (settings.fast_model if ranker == "fast" else settings.model)
        print(f"rerankq worker: loading the {ranker} model {name or 'all-MiniLM-L6-v2 (bundled)'!r} "
              f"on {device}", file=sys.stderr, flush=True)
        loaded = load_ranker(ranker, name, torch_device, settings.max_length)
    except RerankError as exc:
        print(f"rerankq worker: {exc}", file=sys.stderr, flush=True)
        return 1

    from celery.utils.nodenames import host_format

    from tasks import app
    from worker.consumer import ChunkStep, install

    install(loaded, device)
    app.steps["consumer"].add(ChunkStep)
    node = host_format(hostname or f"rerankq-{ranker}-{device.replace(':', '')}-{os.getpid()}@%h")
    worker = app.Worker(hostname=node, pool_cls="solo", concurrency=1, queues=queues, loglevel=loglevel,
                        without_gossip=True, without_mingle=True, task_events=True)
    worker.start()
    return int(worker.exitcode or 0)
