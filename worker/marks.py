"""The watchdog's marks: when a queue's backlog is too long (shed its new jobs) and when it is short again.

Pure policy: a queue's measured load in, a verdict out, with hysteresis so the route does not flap.
"""

from __future__ import annotations

from dataclasses import dataclass

from rerankq.celeryconfig import Settings
from rerankq.tasks.models import ServedModel
from rerankq.tasks.router import QueueLoad


@dataclass(frozen=True)
class Marks:
    high_wait_s: float
    low_wait_s: float
    #: Backlog per live worker a queue may take while its wait is unknown (no batch measured yet): one
    #: window's worth, which its first batches serve. Without it a cold queue (the fast ranker's, when shedding
    #: starts) takes every shed job until its workers first report, and they wait for seconds.
    cold_jobs: int
    high_jobs: int = 0
    low_jobs: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, model: ServedModel | None = None) -> Marks:
        """The deployment's marks, or ``model``'s where it sets its own wait marks."""
        high = model.high_wait_s if model and model.high_wait_s else settings.high_wait_s
        low = model.low_wait_s if model and model.low_wait_s else settings.low_wait_s
        return cls(high, low, settings.max_chunk_jobs, settings.high_jobs, settings.low_jobs)

    def _cold_over(self, load: QueueLoad) -> bool:
        return load.backlog > self.cold_jobs * load.workers

    def over_high(self, load: QueueLoad) -> bool:
        wait = load.wait_s
        return ((self._cold_over(load) if wait is None else wait > self.high_wait_s)
                or bool(self.high_jobs and load.backlog > self.high_jobs))

    def under_low(self, load: QueueLoad) -> bool:
        wait = load.wait_s
        # A cold queue's only mark is its cap: once closed it gets no new jobs, so its backlog cannot flap.
        return ((not self._cold_over(load) if wait is None else wait <= self.low_wait_s)
                and not (self.high_jobs and load.backlog > self.low_jobs))

    def describe(self) -> str:
        jobs = f", jobs high {self.high_jobs} / low {self.low_jobs}" if self.high_jobs else ""
        return f"wait high {self.high_wait_s}s / low {self.low_wait_s}s{jobs}"

    def overloaded(self, was_overloaded: bool, load: QueueLoad) -> bool:
        """Hysteresis: becomes overloaded above the high mark, stays so until at or below the low mark."""
        return not self.under_low(load) if was_overloaded else self.over_high(load)
