"""The FastAPI app of ``rerankq serve``: routes, limits, error answers. Each request awaits
``producer.arerank``: one async Redis connection per event loop waits for every pending request, so one
process holds thousands of them without a thread each."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rerankq.celeryconfig import Settings
from rerankq.producer import arerank
from rerankq.server import errors
from rerankq.server.disconnect import CancelOnDisconnect
from rerankq.server.errors import Overloaded, ServiceUnavailable, Unauthorized
from rerankq.server.health import HealthProbe
from rerankq.server.limits import BodyLimit, check_request, check_token
from rerankq.server.metrics import ServerMetrics
from rerankq.server.schemas import (
    AnyRerankRequest,
    Document,
    Error,
    Health,
    Meta,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankResult,
    TeiRank,
    TeiRerankRequest,
)
from rerankq.tasks import tracing
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.records import Result
from rerankq.tasks.rerank import rerank as rerank_task
from rerankq.tasks.router import PASSTHROUGH, SHED

ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Error}
                                           for status in (401, 413, 422, 424, 429, 500, 503, 504)}
RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")


def create_app(settings: Settings | None = None, queue: str | None = None) -> FastAPI:
    """The app; ``queue`` sends every request to that queue instead of letting rerankq's router pick."""
    if settings is None:
        from rerankq.celeryconfig import settings as configured

        settings = configured
    cfg = settings
    brokers: list[BrokerRedis] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for held in brokers:
            held.close()

    app = FastAPI(title="rerankq", summary="Cross-encoder reranking over Celery + Redis: Cohere's, Jina's and "
                  "text-embeddings-inference's rerank API", lifespan=lifespan)
    metrics = ServerMetrics()

    def broker() -> BrokerRedis:
        if not brokers:
            brokers.append(BrokerRedis(rerank_task.app))
        return brokers[0]

    health = HealthProbe(cfg, broker)

    async def score(query: str, texts: list[str], top_n: int | None, long_docs: str | None,
                    raw_scores: bool = False, model: str | None = None, instruction: str | None = None) -> Result:
        served = cfg.served.resolve(model)  # a model not served: 404, before anything else is looked at
        check_request(cfg, query, texts, instruction)
        # The deployment's own mode is not sent: such a job is one any earlier worker serves too.
        long_docs = None if long_docs == cfg.long_docs else long_docs
        destination = queue
        if cfg.serve_overload == "reject" and destination is None:
            # Read the route first (counting nothing): past the marks the client is told to come back, instead of
            # being degraded or queued behind the backlog.
            router = rerank_task.get_router(served)
            state = await asyncio.get_running_loop().run_in_executor(None, router.state)
            if state is not None and state.route == SHED:
                raise Overloaded(f"{served.queue} is over its marks (RERANKQ_HIGH_WAIT_S={cfg.high_wait_s:g}): "
                                 "retry later")
            destination = served.queue
        result = await arerank(query, texts, top_k=top_n, timeout=cfg.serve_timeout_s, queue=destination,
                               raw_scores=raw_scores, long_docs=long_docs, model=model, instruction=instruction)
        metrics.answers.labels(result.ranker).inc()
        return result

    def timing_headers(response: Response, result: Result) -> None:
        # text-embeddings-inference's header names (milliseconds), and which ranker answered.
        response.headers["x-queue-time"] = f"{result.timings.queue_ms:.1f}"
        response.headers["x-inference-time"] = f"{result.timings.inference_ms:.1f}"
        response.headers["x-rerankq-ranker"] = result.ranker
        response.headers["x-rerankq-model"] = result.model

    async def cohere(body: RerankRequest, response: Response) -> RerankResponse:
        texts = body.texts()
        result = await score(body.query, texts, body.top_n, body.long_docs_mode(), model=body.model,
                             instruction=body.instruction)
        timing_headers(response, result)
        return RerankResponse(
            id=str(uuid.uuid4()),
            results=[RerankResult(index=i, relevance_score=result.scores[i],
                                  document=Document(text=texts[i]) if body.return_documents else None)
                     for i in result.ranked()],
            meta=Meta(ranker=result.ranker, model=result.model, passthrough=result.ranker == PASSTHROUGH,
                      queue_ms=result.timings.queue_ms, inference_ms=result.timings.inference_ms))

    async def tei(body: TeiRerankRequest, response: Response) -> list[TeiRank]:
        result = await score(body.query, body.texts, None, body.long_docs_mode(), raw_scores=body.raw_scores,
                             model=body.model, instruction=body.instruction)
        timing_headers(response, result)
        return [TeiRank(index=i, score=result.scores[i], text=body.texts[i] if body.return_text else None)
                for i in result.ranked()]

    @app.post("/rerank", response_model=RerankResponse | list[TeiRank], response_model_exclude_none=True,
              responses=ERRORS, summary="Rerank: Cohere's body (`documents`) or TEI's (`texts`)")
    async def rerank_any(response: Response,
                         body: AnyRerankRequest = Body()) -> RerankResponse | list[TeiRank]:  # noqa: B008
        if isinstance(body, TeiRerankRequest):
            return await tei(body, response)
        return await cohere(body, response)

    for path in ("/v1/rerank", "/v2/rerank"):
        app.post(path, response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS,
                 summary="Rerank, in Cohere's and Jina's shape")(cohere)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def get_health() -> JSONResponse:
        verdict = await health.check()
        return JSONResponse(verdict.model_dump(), status_code=503 if verdict.status == "unavailable" else 200)

    @app.get("/v1/models", response_model=ModelList, responses={503: {"model": Error}},
             summary="The served models (OpenAI's list shape), each with its health and live workers")
    async def list_models() -> ModelList:
        verdict = await health.check()
        if not verdict.models:  # Redis did not answer: nothing is known of any model
            raise ServiceUnavailable(f"cannot list the models' state: {verdict.reason}")
        return ModelList(data=[
            ModelCard(id=m.name, aliases=list(m.aliases), status=verdict.models[m.name].status,
                      live_workers=verdict.workers.get(m.queue, 0), default=m == cfg.served.default)
            for m in cfg.served])

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Added first, so the accounting around it counts its 413s too.
    app.add_middleware(BodyLimit, max_bytes=cfg.serve_max_body_bytes, paths=RERANK_PATHS)

    @app.middleware("http")
    async def account(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        began = time.perf_counter()
        metrics.in_flight.inc()
        try:
            # The key before anything else: a stranger learns nothing from how their body is judged.
            if request.url.path in (*RERANK_PATHS, "/v1/models"):  # what is served is the key holders' to know
                check_token(cfg, request)
            with tracing.joined(request.headers):  # a client's traceparent: its jobs join its trace
                response = await call_next(request)
        except Unauthorized as exc:
            response = errors.error(401, "unauthorized", str(exc))
        finally:
            metrics.in_flight.dec()
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        elapsed = time.perf_counter() - began
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.seconds.labels(path).observe(elapsed)
        response.headers["x-total-time"] = f"{elapsed * 1000:.1f}"
        return response

    errors.install(app, cfg.route_ttl_s)
    # Outermost: a client that leaves before its answer cancels the request, and its job is revoked.
    app.add_middleware(CancelOnDisconnect, paths=RERANK_PATHS)
    return app
