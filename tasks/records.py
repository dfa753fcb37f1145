"""The job and result records shared by producers and workers, and the job's validation.

A job travels as the Celery task's arguments:
``rerank(query, docs, top_k=None, deadline=None, raw_scores=False, long_docs=None, instruction=None)``.
A result travels as a JSON object (``Result.to_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rerankq.tasks.errors import BadJob

JOB_FIELDS = ("query", "docs", "top_k", "deadline", "raw_scores", "long_docs", "instruction")
#: What becomes of a doc longer than the model reads beside the query (``worker/windows.py``): truncated at
#: its end, or at its start; split into overlapping windows, the doc taking its best window's score; refused.
TRUNCATE, TRUNCATE_LEFT, SPLIT, REFUSE = "truncate", "truncate-left", "split", "refuse"
LONG_DOCS = (TRUNCATE, TRUNCATE_LEFT, SPLIT, REFUSE)


@dataclass(frozen=True)
class Job:
    query: str
    docs: list[str]
    top_k: int | None = None
    #: Unix time (seconds) after which the result is useless; the job is then not scored.
    deadline: float | None = None
    #: The model's own output (a cross-encoder's logit) instead of its score after the activation (a sigmoid).
    raw_scores: bool = False
    #: One of ``LONG_DOCS``; None means the deployment's ``RERANKQ_LONG_DOCS``.
    long_docs: str | None = None
    #: What an LLM reranker is asked to judge by (its prompt's ``<Instruct>``); None means the model's own default.
    #: A cross-encoder refuses one (``Ranker.check_instruction``).
    instruction: str | None = None

    @classmethod
    def from_call(cls, args: Sequence[Any], kwargs: Mapping[str, Any], max_docs: int,
                  max_query_chars: int | None = None) -> Job:
        """Validate a task call's arguments; raise ``BadJob`` saying what is wrong."""
        if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping):
            raise BadJob("a job is rerank(query, docs, top_k=None, deadline=None, raw_scores=False, long_docs=None, "
                         "instruction=None)")
        if len(args) > len(JOB_FIELDS):
            raise BadJob(f"a job takes at most {len(JOB_FIELDS)} arguments ({', '.join(JOB_FIELDS)}), "
                         f"got {len(args)}")
        unknown = sorted(set(map(str, kwargs)) - set(JOB_FIELDS))
        if unknown:
            raise BadJob(f"unknown field {unknown[0]!r}: a job has only {', '.join(JOB_FIELDS)}")
        values = dict(zip(JOB_FIELDS, args, strict=False))
        for name, value in kwargs.items():
            if name in values:
                raise BadJob(f"{name!r} given twice (positionally and by name)")
            values[name] = value
        for name in ("query", "docs"):
            if name not in values:
                raise BadJob(f"missing {name!r}: a job is rerank(query, docs)")
        return cls(
            query=_query(values["query"], max_query_chars),
            docs=_docs(values["docs"], max_docs),
            top_k=_top_k(values.get("top_k")),
            deadline=_deadline(values.get("deadline")),
            raw_scores=_flag("raw_scores", values.get("raw_scores", False)),
            long_docs=_long_docs(values.get("long_docs")),
            instruction=_instruction(values.get("instruction"), max_query_chars),
        )


def _query(value: Any, max_chars: int | None) -> str:
    if not isinstance(value, str):
        raise BadJob(f"query must be a string, got {type(value).__name__}")
    check_query(value, max_chars)
    return value


def check_query(query: str, max_chars: int | None) -> None:
    """An empty query, or one over ``max_chars`` characters (RERANKQ_MAX_QUERY_CHARS), as ``BadJob``."""
    check_query_length(query, max_chars)
    if not query.strip():
        raise BadJob("query is empty: send the text to rank the docs against")


def check_query_length(query: str, max_chars: int | None) -> None:
    """A query over ``max_chars`` characters (RERANKQ_MAX_QUERY_CHARS), as ``BadJob``."""
    if max_chars is not None and len(query) > max_chars:
        raise BadJob(f"the query is {len(query)} characters, over the limit of {max_chars} (RERANKQ_MAX_QUERY_CHARS): "
                     "the model reads only its first RERANKQ_MAX_LENGTH tokens beside each doc anyway")


def _docs(value: Any, max_docs: int) -> list[str]:
    if not isinstance(value, list | tuple):
        raise BadJob(f"docs must be a list of strings, got {type(value).__name__}")
    if len(value) > max_docs:
        raise BadJob(f"{len(value)} docs is over the limit of {max_docs} per job (RERANKQ_MAX_DOCS): "
                     "split the job")
    for i, doc in enumerate(value):
        if not isinstance(doc, str):
            raise BadJob(f"docs[{i}] must be a string, got {type(doc).__name__}")
    return list(value)


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadJob(f"top_k must be a positive integer or null, got {value!r}")
    return value


def _deadline(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadJob(f"deadline must be a Unix time in seconds or null, got {value!r}")
    return float(value)


def _long_docs(value: Any) -> str | None:
    if value is not None and value not in LONG_DOCS:
        raise BadJob(f"long_docs must be one of {', '.join(map(repr, LONG_DOCS))} or null, got {value!r}")
    return value  # type: ignore[no-any-return]


def _instruction(value: Any, max_chars: int | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadJob(f"instruction must be a string or null, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise BadJob(f"the instruction is {len(value)} characters, over the limit of {max_chars} "
                     "(RERANKQ_MAX_QUERY_CHARS, which bounds it as it bounds the query)")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadJob(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Timings:
    #: From the producer sending the job (or the worker receiving it) to its first forward batch starting.
    queue_ms: float
    #: From its first forward batch starting to its last pair scored.
    inference_ms: float


@dataclass(frozen=True)
class BatchInfo:
    """One forward batch (one call of the model) that scored pairs of this job."""

    #: ``<worker>#<n>``: the same id in every job the batch scored.
    id: str
    #: Jobs with pairs in it, and all its pairs.
    jobs: int
    pairs: int
    #: Pairs x its longest pair: what the model ran.
    padded_tokens: int


@dataclass(frozen=True)
class Result:
    #: One score per doc, in the input order of ``docs``; higher is more relevant.
    scores: list[float]
    ranker: str
    model: str
    timings: Timings
    #: With ``top_k``: indices of the ``top_k`` best docs, best first.
    top: list[int] | None = None
    #: The forward batches that scored its pairs, in the order they ran.
    batches: list[BatchInfo] = field(default_factory=list)

    def ranked(self) -> list[int]:
        """Indices of the docs to answer with, best first: ``top`` when the job asked for ``top_k``, else all."""
        return self.top if self.top is not None else top_indices(self.scores, len(self.scores))

    def to_dict(self) -> dict[str, Any]:
        # Written out: ``asdict`` deep-copies each score, 20 µs of a worker's ~650 per job when the model costs
        # nothing (BENCHMARKS.md "Per-job overhead"). A test checks that the two agree, so no new field is left out.
        t, top = self.timings, self.top
        return {"scores": list(self.scores), "ranker": self.ranker, "model": self.model,
                "timings": {"queue_ms": t.queue_ms, "inference_ms": t.inference_ms},
                "top": None if top is None else list(top),
                "batches": [{"id": b.id, "jobs": b.jobs, "pairs": b.pairs, "padded_tokens": b.padded_tokens}
                            for b in self.batches]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        return cls(
            scores=list(data["scores"]),
            ranker=data["ranker"],
            model=data["model"],
            timings=Timings(**data["timings"]),
            top=data.get("top"),
            batches=[BatchInfo(**batch) for batch in data.get("batches") or []],
        )


def top_indices(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
