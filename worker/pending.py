"""A received job on its way through a worker: from the event loop, through the preparer, to the runner."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rerankq.tasks.lanes import INTERACTIVE
from rerankq.tasks.records import BatchInfo, Job
from rerankq.tasks.rerank import SENT_AT_HEADER

if TYPE_CHECKING:  # rankers import torch, which must wait for the GPU pinning
    from rerankq.worker.rankers import Encoded


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
    #: The (query, text) pairs tokenised by the preparer (``Ranker.encode``), and the tokens each costs.
    encoded: Encoded | None = None
    costs: list[int] = field(default_factory=list)
    error: BaseException | None = None
    #: Filled in by the runner, per pair: scores so far, the pairs not in a forward batch yet (longest first) and
    #: their tokens, and how many are in one (chosen, not scored yet).
    scores: list[float] = field(default_factory=list)
    left: list[int] = field(default_factory=list)
    left_tokens: int = 0
    flying: int = 0
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
        self.left = self._longest_first(range(len(self.costs)))
        self.left_tokens = self.tokens

    @property
    def done(self) -> bool:
        """It has its outcome: failed, or every pair scored."""
        return self.error is not None or not (self.left or self.flying)

    def take(self, indices: list[int]) -> None:
        """Its pairs ``indices`` are in a forward batch: no later batch is to take them."""
        chosen = set(indices)
        self.left = [i for i in self.left if i not in chosen]
        self.left_tokens -= sum(self.costs[i] for i in indices)
        self.flying += len(indices)

    def give_back(self, indices: list[int]) -> None:
        """Its pairs ``indices`` left a batch that will not run: to be chosen again, in their place."""
        self.left = self._longest_first([*self.left, *indices])
        self.left_tokens += sum(self.costs[i] for i in indices)
        self.flying -= len(indices)

    def _longest_first(self, indices: Iterable[int]) -> list[int]:
        return sorted(indices, key=lambda i: -self.costs[i])

    def scored(self, indices: list[int], scores: list[float]) -> None:
        for index, score in zip(indices, scores, strict=True):
            self.scores[index] = score
        self.flying -= len(indices)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.left, self.left_tokens = [], 0
