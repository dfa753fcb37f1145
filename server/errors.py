"""Every error ``rerankq serve`` answers, in one shape: ``message`` (where Cohere's clients look), ``error``
and ``error_type`` (text-embeddings-inference's), with the status each of rerankq's errors maps to."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from starlette.exceptions import HTTPException

from rerankq.server.schemas import Error
from rerankq.tasks import BadJob, DeadlineExceeded, RankerFailed, RedisFull, RerankError, RerankTimeout
from rerankq.tasks.errors import Misrouted, UnknownModel

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]
UNREACHABLE = ": is Redis up, and RERANKQ_BROKER_URL / RERANKQ_RESULT_BACKEND right?"


class Overloaded(RerankError):
    """The GPU queue is over its marks and this server answers 429 instead of degrading."""


class ServiceUnavailable(RerankError):
    """Redis does not answer, so this request cannot be answered (503)."""


class Unauthorized(RerankError):
    """The request's API key is missing or wrong."""


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
          param: str | None = None) -> JSONResponse:
    body = Error(message=message, error=message, error_type=kind, param=param).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


#: Validation errors an answer shows at most (a body can hold one per item of its lists), and characters of each.
MAX_REASONS, REASON_CHARS = 10, 300


def _reason(found: dict[str, Any]) -> str:
    where = [str(p) for p in found["loc"] if p not in ("body", "cohere", "tei")]  # the body's own field path
    ctx = found.get("ctx") or {}
    if found["type"] == "too_long" and where and where[-1] in ("documents", "texts"):
        return (f"{ctx.get('actual_length')} documents is over the limit of {ctx.get('max_length')} per request "
                "(RERANKQ_MAX_DOCS): split the request")
    return f"{'.'.join(where)}: {found['msg']}"[:REASON_CHARS]


def install(app: FastAPI, retry_after_s: float) -> None:
    def handle(status: int, kind: str, advice: str = "") -> Handler:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))} if status == 429 else None
            return error(status, kind, f"{exc}{advice}", headers)
        return handler

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        found = exc.errors()
        shown = "; ".join(_reason(e) for e in found[:MAX_REASONS])
        more = f" (and {len(found) - MAX_REASONS} more)" if len(found) > MAX_REASONS else ""
        return error(422, "validation", shown + more)

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, "http", str(exc.detail), dict(exc.headers or {}))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error(500, "internal", f"rerankq serve failed on this request: {exc!r} (its log has the traceback)")

    async def unknown_model(request: Request, exc: Exception) -> JSONResponse:
        # vLLM's and OpenAI's answer to a model not served: 404, naming the field.
        return error(404, "not_found", str(exc), param="model")

    app.add_exception_handler(UnknownModel, unknown_model)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(BadJob, handle(422, "validation"))
    app.add_exception_handler(Unauthorized, handle(401, "unauthorized"))
    app.add_exception_handler(Overloaded, handle(429, "overloaded"))
    app.add_exception_handler(RerankTimeout, handle(504, "timeout"))
    app.add_exception_handler(DeadlineExceeded, handle(504, "timeout"))
    # TEI's status for a model that failed: a failed dependency, which clients do not retry (it would fail again).
    app.add_exception_handler(RankerFailed, handle(424, "backend"))
    app.add_exception_handler(RedisFull, handle(503, "unhealthy"))
    app.add_exception_handler(ServiceUnavailable, handle(503, "unhealthy"))
    app.add_exception_handler(Misrouted, handle(503, "unhealthy"))
    for kind in (OperationalError, RedisConnectionError, RedisTimeout):
        app.add_exception_handler(kind, handle(503, "unhealthy", UNREACHABLE))
    app.add_exception_handler(Exception, unexpected)
