"""A rerank HTTP endpoint in front of rerankq, in the shape of the common rerank APIs.

    pip install 'rerankq[examples]'
    RERANKQ_BROKER_URL=redis://localhost:6379/0 uvicorn examples.rerank_api:app --port 8000

    curl -s localhost:8000/rerank -H 'content-type: application/json' \\
      -d '{"query": "what is a sourdough starter", "documents": ["flour and water", "a river bank"], "top_n": 1}'

Each request awaits ``producer.arerank``: one async Redis connection per event loop waits for every
pending request, so a single uvicorn process holds thousands of them. Status codes: 422 for a body that is
not a rerank request (the reason in ``detail``, as FastAPI words its own), 504 when no result came within
``RERANKQ_API_TIMEOUT_S`` (default 30), 503 when Redis cannot be reached, 500 when the model failed on the
request. A response with ``"passthrough": true`` holds the documents in the order they were sent: both
queues were over their marks and rerankq answered at once instead of waiting.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import arerank
from tasks import BadJob, DeadlineExceeded, RankerFailed, RerankTimeout
from tasks.records import top_indices
from tasks.router import PASSTHROUGH


class RerankRequest(BaseModel):
    # Strict: a number is not a document, "3" is not a top_n. Unknown fields (a client's "model") are ignored.
    model_config = ConfigDict(strict=True)

    query: str
    documents: list[str]
    #: Return only the best ``top_n`` results; all of them when absent.
    top_n: int | None = Field(default=None, ge=1)
    #: Echo each result's document text.
    return_documents: bool = False


class Document(BaseModel):
    text: str


class RerankResult(BaseModel):
    #: Position of the document in the request's ``documents``.
    index: int
    relevance_score: float
    document: Document | None = None


class Meta(BaseModel):
    ranker: str
    model: str
    queue_ms: float
    inference_ms: float


class RerankResponse(BaseModel):
    id: str
    #: Best first.
    results: list[RerankResult]
    #: True when the results are the request's own order, not model scores (rerankq was shedding load).
    passthrough: bool
    meta: Meta


def create_app(timeout_s: float = 30.0, queue: str | None = None) -> FastAPI:
    """The app; ``queue`` sends every request to that queue instead of letting rerankq's router pick."""
    app = FastAPI(title="rerankq", summary="Cross-encoder reranking over Celery + Redis")

    @app.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True)
    async def rerank(body: RerankRequest) -> RerankResponse:
        result = await arerank(body.query, body.documents, top_k=body.top_n, timeout=timeout_s, queue=queue)
        order = result.top if result.top is not None else top_indices(result.scores, len(result.scores))
        return RerankResponse(
            id=str(uuid.uuid4()),
            results=[RerankResult(index=i, relevance_score=result.scores[i],
                                  document=Document(text=body.documents[i]) if body.return_documents else None)
                     for i in order],
            passthrough=result.ranker == PASSTHROUGH,
            meta=Meta(ranker=result.ranker, model=result.model, queue_ms=result.timings.queue_ms,
                      inference_ms=result.timings.inference_ms))

    def error(status: int, kind: str, advice: str = "") -> Any:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": [{"type": kind, "loc": ["body"], "msg": f"{exc}{advice}"}]},
                                status_code=status)
        return handler

    # rerankq's own checks (empty query, too many documents) read like FastAPI's validation errors.
    app.add_exception_handler(BadJob, error(422, "bad_job"))
    app.add_exception_handler(RerankTimeout, error(504, "timeout"))
    app.add_exception_handler(DeadlineExceeded, error(504, "timeout"))
    app.add_exception_handler(RankerFailed, error(500, "ranker_failed"))
    unreachable = error(503, "redis_unreachable",
                        ": is Redis up, and RERANKQ_BROKER_URL / RERANKQ_RESULT_BACKEND right?")
    app.add_exception_handler(OperationalError, unreachable)
    app.add_exception_handler(RedisConnectionError, unreachable)
    return app


app = create_app(timeout_s=float(os.environ.get("RERANKQ_API_TIMEOUT_S", "30")))
