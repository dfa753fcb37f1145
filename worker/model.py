"""Calling the model on one forward batch: its figures recorded, its scores handed back to their jobs, and a
batch it raises on retried by halves of its jobs until the culprit is alone (out of memory splits a lone
job's pairs down to one per call), so a bad job never fails its batch-mates."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence

from rerankq.tasks.errors import DeviceLost, RankerFailed
from rerankq.worker import metrics
from rerankq.worker.batching import Pace
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Ranker, is_device_lost, is_out_of_memory, release_cached_memory
from rerankq.worker.stats import Recent

logger = logging.getLogger(__name__)

Batch = Sequence[tuple[Pending, int]]


def padded_tokens(batch: Batch) -> int:
    """What the model runs for a batch: every pair padded to its longest."""
    return len(batch) * max(p.costs[i] for p, i in batch)


#: (pairs, words per doc) of the forward batches a worker runs before it receives jobs.
WARM_UP = ((1, 8), (8, 64), (16, 128))


def warm_up(ranker: Ranker) -> float:
    """Run the model over a few batch shapes before any job: the first forward of a process (CUDA's kernels
    chosen and compiled, memory reserved; 0.5-3 s) is not a job's, and is not learned from by ``Pace``.
    Returns the seconds it took."""
    began = time.perf_counter()
    if ranker.kind != "simulated":  # it has no cold start
        for pairs, words in WARM_UP:
            ranker.score([("warm up", " ".join(["warm"] * words))] * pairs)
    return time.perf_counter() - began


class Model:
    def __init__(self, ranker: Ranker, recent: Recent) -> None:
        self.ranker = ranker
        self.recent = recent
        #: The measured cost of a forward batch, to size the next one for the time target.
        self.pace = Pace()

    def forward(self, batch: Batch) -> None:
        """One call of the model; if it raises, retry by halves so only the culprit fails."""
        batch = [(p, i) for p, i in batch if p.error is None]
        if not batch:
            return
        pairs = [(p.query, p.texts[i]) for p, i in batch]
        began = time.perf_counter()
        try:
            scores = self.ranker.score(pairs)
            if len(scores) != len(pairs):
                raise RankerFailed(f"the model gave {len(scores)} scores for {len(pairs)} pairs")
        except Exception as exc:
            if is_device_lost(exc):  # retried by halves, every batch would fail the same way
                raise DeviceLost(f"the GPU failed while scoring this job ({exc!r}); its worker restarts") from exc
            self._isolate(batch, exc)
            return
        busy_s = time.perf_counter() - began
        lengths = [p.costs[i] for p, i in batch]
        padded = padded_tokens(batch)
        self.pace.add(busy_s, padded)
        self.recent.busy(busy_s)
        metrics.BUSY.inc(busy_s)
        metrics.BATCH_PAIRS.observe(len(batch))
        metrics.BATCH_PADDED.observe(padded)
        metrics.BATCH_JOBS.observe(len({id(p) for p, _ in batch}))
        metrics.REAL_TOKENS.inc(sum(lengths))
        metrics.PADDED_TOKENS.inc(padded)
        by_job: dict[Pending, tuple[list[int], list[float]]] = {}
        for (pending, index), score in zip(batch, scores, strict=True):
            indices, values = by_job.setdefault(pending, ([], []))
            indices.append(index)
            values.append(score)
        for pending, (indices, values) in by_job.items():
            bad = [(i, v) for i, v in zip(indices, values, strict=True) if not math.isfinite(v)]
            if bad:  # an overflow (fp16), or a broken model: this job fails, not its batch-mates nor the answer
                doc, value = bad[0]
                pending.fail(RankerFailed(f"the {self.ranker.kind} model gave a non-finite score ({value}) for "
                                          f"doc {doc} of this job"))
            else:
                pending.scored(indices, values)

    def _isolate(self, batch: Batch, exc: Exception) -> None:
        jobs = list(dict.fromkeys(p for p, _ in batch))
        if len(jobs) > 1:
            logger.warning("model raised on a batch of %d jobs (%r); retrying by halves", len(jobs), exc)
            first = set(jobs[:len(jobs) // 2])
            self.forward([(p, i) for p, i in batch if p in first])
            self.forward([(p, i) for p, i in batch if p not in first])
        elif is_out_of_memory(exc) and len(batch) > 1:
            with contextlib.suppress(Exception):
                release_cached_memory()
            half = len(batch) // 2
            self.forward(batch[:half])
            self.forward(batch[half:])
        else:
            jobs[0].fail(RankerFailed(f"the {self.ranker.kind} model failed on this job: {exc!r}"))
