"""Calling the model on one forward batch: its figures recorded, its scores handed back to their jobs, and a
batch it raises on retried by halves of its jobs until the culprit is alone (out of memory splits a lone
job's pairs down to one per call), so a bad job never fails its batch-mates."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rerankq.tasks.errors import DeviceLost, RankerFailed
from rerankq.worker import metrics
from rerankq.worker.batching import Pace, memory_budget
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Launched, Ranker, is_device_lost, is_out_of_memory, release_cached_memory
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
    chosen and compiled, memory reserved; 0.5-3 s) is not a job's, and is not learned from by ``Pace``. On a GPU
    it measures the memory a padded token takes, and sets ``ranker.fits_tokens`` from the memory left.
    Returns the seconds it took."""
    began = time.perf_counter()
    if ranker.kind == "simulated":  # it has no cold start
        return 0.0
    cuda = ranker.device.startswith("cuda")
    per_token = 0.0
    for pairs, words in WARM_UP:
        doc = " ".join(["warm"] * words)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        ranker.score([("warm up", doc)] * pairs)
        if cuda:
            padded = pairs * ranker.encode("warm up", [doc]).costs[0]
            per_token = max(per_token, (torch.cuda.max_memory_allocated() - held) / padded)
    if cuda and per_token > 0:
        free, _ = torch.cuda.mem_get_info()
        ranker.fits_tokens = memory_budget(free, per_token, ranker.max_length)
    return time.perf_counter() - began


@dataclass
class Flight:
    """A forward batch launched and not read yet."""

    batch: list[tuple[Pending, int]]
    launched: Launched
    #: Seconds ``launch`` took: all of the forward on a CPU, the kernel launches on a GPU.
    launch_s: float


@dataclass(frozen=True)
class Failure:
    """What a failed forward left to act on: its exception's text, not the exception, whose traceback holds the
    forward's frames and with them its activations (pytorch#18853): a retry beside them could run out of memory
    again where alone it fits."""

    text: str
    out_of_memory: bool


class Model:
    """Runs forward batches (the runner thread alone calls it): ``launch`` then ``land``, or ``forward`` for both."""

    def __init__(self, ranker: Ranker, recent: Recent) -> None:
        self.ranker = ranker
        self.recent = recent
        #: The measured cost of a forward batch, to size the next one for the time target.
        self.pace = Pace()
        #: The fewest padded tokens of a batch of several pairs that ran out of memory (None: none did).
        self.out_of_memory_at: int | None = None

    def prepare(self, batch: Batch) -> Any:
        try:
            return self.ranker.prepare([(p.encoded, i) for p, i in batch if p.encoded is not None])
        except Exception as exc:  # on a GPU, the copy is where an error of the batch before may surface
            if is_device_lost(exc):
                raise _lost(exc) from exc
            raise

    def launch(self, batch: Batch, prepared: Any = None) -> Flight | None:
        """Start a forward batch (from its ``prepare``d inputs, if they hold these pairs). If the model raises, the
        batch is retried by halves at once, so that only the culprit fails, and None is returned."""
        live = [(p, i) for p, i in batch if p.error is None]
        if not live:
            return None
        began = time.perf_counter()
        failure = None
        try:
            if prepared is None or len(live) < len(batch):
                prepared = self.prepare(live)
            launched = self.ranker.launch(prepared)
        except Exception as exc:
            failure = self._failure(exc)
        if failure is not None:  # outside the except: the failed forward's memory is free again
            self._isolate(live, failure)
            return None
        return Flight(live, launched, time.perf_counter() - began)

    def land(self, flight: Flight) -> None:
        """Wait for a launched batch's scores and hand them to their jobs (retried by halves if it raised)."""
        batch, began = flight.batch, time.perf_counter()
        failure = None
        try:
            scores = self.ranker.read(flight.launched)
            if len(scores) != len(batch):
                raise RankerFailed(f"the model gave {len(scores)} scores for {len(batch)} pairs")
        except Exception as exc:
            failure = self._failure(exc)
        if failure is not None:
            self._isolate(batch, failure)
            return
        busy_s = flight.launch_s + time.perf_counter() - began  # the forward, not what the runner did meanwhile
        padded = padded_tokens(batch)
        self.pace.add(busy_s, padded)
        self.recent.busy(busy_s)
        metrics.BUSY.inc(busy_s)
        if flight.launched.device_s is not None:
            metrics.DEVICE_BUSY.inc(flight.launched.device_s)
        metrics.BATCH_PAIRS.observe(len(batch))
        metrics.BATCH_PADDED.observe(padded)
        metrics.BATCH_JOBS.observe(len({id(p) for p, _ in batch}))
        metrics.REAL_TOKENS.inc(sum(p.costs[i] for p, i in batch))
        metrics.PADDED_TOKENS.inc(padded)
        by_job: dict[Pending, tuple[list[int], list[float]]] = {}
        for (pending, index), score in zip(batch, scores, strict=True):
            indices, values = by_job.setdefault(pending, ([], []))
            indices.append(index)
            values.append(score)
        for pending, (indices, values) in by_job.items():
            if pending.error is not None:  # failed while this batch ran (its deadline, say): it has its outcome
                continue
            bad = [(i, v) for i, v in zip(indices, values, strict=True) if not math.isfinite(v)]
            if bad:  # an overflow (fp16), or a broken model: this job fails, not its batch-mates nor the answer
                doc, value = bad[0]
                pending.fail(RankerFailed(f"the {self.ranker.kind} model gave a non-finite score ({value}) for "
                                          f"doc {doc} of this job"))
            else:
                pending.scored(indices, values)

    def forward(self, batch: Batch) -> None:
        """One forward batch, launched and read: its pairs taken off their jobs' ``left`` already."""
        flight = self.launch(batch)
        if flight is not None:
            self.land(flight)

    def _failure(self, exc: Exception) -> Failure:
        if isinstance(exc, DeviceLost):  # found by prepare
            raise exc
        if is_device_lost(exc):  # retried by halves, every batch would fail the same way
            raise _lost(exc) from exc
        return Failure(repr(exc), is_out_of_memory(exc))

    def _isolate(self, batch: Batch, failure: Failure) -> None:
        jobs = list(dict.fromkeys(p for p, _ in batch))
        if failure.out_of_memory:
            with contextlib.suppress(Exception):
                release_cached_memory()
            if len(batch) > 1:
                padded = padded_tokens(batch)
                self.out_of_memory_at = min(padded, self.out_of_memory_at or padded)
        if len(jobs) > 1:
            logger.warning("model raised on a batch of %d jobs (%s); retrying by halves", len(jobs), failure.text)
            first = set(jobs[:len(jobs) // 2])
            self.forward([(p, i) for p, i in batch if p in first])
            self.forward([(p, i) for p, i in batch if p not in first])
        elif failure.out_of_memory and len(batch) > 1:
            half = len(batch) // 2
            self.forward(batch[:half])
            self.forward(batch[half:])
        else:
            jobs[0].fail(RankerFailed(f"the {self.ranker.kind} model failed on this job: {failure.text}"))


def _lost(exc: Exception) -> DeviceLost:
    return DeviceLost(f"the GPU failed while scoring this job ({exc!r}); its worker restarts")
