"""A received job on its way through a worker: from the event loop, through the preparer, to the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rerankq.tasks.lanes import INTERACTIVE
from rerankq.tasks.records import BatchInfo, Job
from rerankq.tasks.rerank import SENT_AT_HEADER


@dataclass(eq=False)
class Pending:
    request: Any
    #: When this worker received it (wall clock).
    received: float
    #: The routing key it came with (its queue), and that queue's lane.
    queue: str = ""
    lane: str = INTERACTIVE
    job: Job | None = None
    #: The job's query as the model reads it (``Ranker.query_read``), set by the preparer.
    query: str = ""
    #: The text of each pair scored: the docs, or their pieces (``worker/windows.py``), and the doc of each.
    texts: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    #: Tokens of each (query, text) pair, counted by the preparer.
    costs: list[int] = field(default_factory=list)
    error: BaseException | None = None
    #: Filled in by the runner, per pair: scores so far, the pairs not scored yet (longest first) and their tokens.
    scores: list[float] = field(default_factory=list)
    left: list[int] = field(default_factory=list)
    left_tokens: int = 0
    #: When its first forward batch started (wall clock), and the batches that scored it.
    started: float | None = None
    batches: list[BatchInfo] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.costs)

    @property
    def tag(self) -> str:
        return str(self.request.message.delivery_tag)

    @property
    def sent_at(self) -> float:
        """When the producer sent the job (its header), or when this worker received it."""
        try:
            return float(self.request.request_dict.get(SENT_AT_HEADER) or self.received)
        except (TypeError, ValueError):
            return self.received

    def begin(self) -> None:
        """Ready to be scheduled: every pair left, longest first."""
        self.scores = [0.0] * len(self.costs)
        self.left = sorted(range(len(self.costs)), key=lambda i: -self.costs[i])
        self.left_tokens = self.tokens

    def scored(self, indices: list[int], scores: list[float]) -> None:
        done = set(indices)
        for index, score in zip(indices, scores, strict=True):
            self.scores[index] = score
        self.left = [i for i in self.left if i not in done]
        self.left_tokens -= sum(self.costs[i] for i in indices)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.left, self.left_tokens = [], 0
