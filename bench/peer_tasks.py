"""The two Celery peers rerankq is measured against, as their users would write them.

* ``peers.naive``: one task per request, one ``CrossEncoder.predict`` per task.
* ``peers.batched``: celery-batches' ``Batches`` task, flushing ``flush_every`` requests (or every
  ``flush_interval`` seconds) as one ``predict`` over all their pairs, results stored per request as its
  README shows.

``PEERS_MODEL`` is a model path, or ``zero`` for a ranker that costs nothing (pure queue overhead);
``PEERS_DEVICE`` its device (fp16 on CUDA, as rerankq runs it).
Workers: ``celery -A bench.peer_tasks worker -Q peers.naive`` (or ``peers.batched``), solo pool.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from celery import Celery
from celery_batches import Batches

BATCH_SIZE = 32
#: celery-batches, set as rerankq's chunk defaults: 64 requests, or 10 ms.
FLUSH_EVERY = 64
FLUSH_INTERVAL_S = 0.01

app = Celery("peers", broker=os.environ.get("PEERS_REDIS_URL"), backend=os.environ.get("PEERS_REDIS_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_acks_late=True, result_expires=3600,
                # celery-batches needs the prefetch above flush_every; one request at a time for naive.
                worker_prefetch_multiplier=int(os.environ.get("PEERS_PREFETCH", "1")))


@cache
def _model() -> Any:
    from sentence_transformers import CrossEncoder

    device = os.environ.get("PEERS_DEVICE", "cpu")
    model = CrossEncoder(os.environ["PEERS_MODEL"], device=device)
    if device.startswith("cuda"):
        model.model.half()
    return model


def _predict(pairs: list[tuple[str, str]]) -> list[float]:
    if os.environ["PEERS_MODEL"] == "zero":
        return [0.0] * len(pairs)
    scores = _model().predict(pairs, batch_size=BATCH_SIZE, show_progress_bar=False)
    return [float(s) for s in scores]


@app.task(name="peers.naive")
def naive(query: str, docs: list[str]) -> list[float]:
    return _predict([(query, d) for d in docs])


@app.task(name="peers.batched", base=Batches, flush_every=FLUSH_EVERY, flush_interval=FLUSH_INTERVAL_S)
def batched(requests: list[Any]) -> None:
    pairs = [(r.args[0], d) for r in requests for d in r.args[1]]
    scores = _predict(pairs)
    start = 0
    for request in requests:
        n = len(request.args[1])
        app.backend.mark_as_done(request.id, scores[start:start + n], request=request)
        start += n
