"""The ``rerank`` task: the one name producers call and workers serve."""

from __future__ import annotations

import json
import uuid
from typing import Any, ClassVar

from celery import Task, states
from celery.result import EagerResult
from celery.signals import before_task_publish

from rerankq.tasks import clock, lanes, memory, tracing
from rerankq.tasks.app import app
from rerankq.tasks.connections import BrokerRedis, broker_shown
from rerankq.tasks.errors import BadJob, RerankError
from rerankq.tasks.models import ServedModel
from rerankq.tasks.records import check_query_length
from rerankq.tasks.router import PASSTHROUGH, Router, passthrough_result

TASK_NAME = "rerankq.rerank"
#: Message header with the time the job was published, for the result's queue wait.
SENT_AT_HEADER = "rerankq_sent_at"
#: Message header with the served model a job was routed to by name (tasks/models.py): a worker whose own list of
#: models gives the job's queue to another model fails the job (``Misrouted``) instead of scoring it.
MODEL_HEADER = "rerankq_model"
#: Options by which a caller picks the destination itself; the router then stays out of the way.
_DESTINATION_OPTIONS = ("queue", "routing_key", "exchange")


class RerankTask(Task):
    """A Celery task whose messages are consumed many at a time instead of run one by one.

    The worker-side ``Strategy`` buffers each received job into the chunk consumer, which scores many
    jobs in one batched inference and then stores, announces and acks each job on its own: every job
    keeps its id, its ``AsyncResult`` and its task events.
    """

    Strategy = "rerankq.worker.consumer:chunk_strategy"
    # Arguments are validated by the worker, so a malformed call fails its own job (raised by .get()).
    typing = False
    #: Set on first use from the settings; replace it to route with other queues or marks.
    router: Router | None = None
    #: The routers of the other served models, by name.
    _routers: ClassVar[dict[str, Router]] = {}
    _clock_broker: BrokerRedis | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, lane: str = lanes.INTERACTIVE,
                    **options: Any) -> Any:
        """Celery's ``apply_async``, plus ``lane``: ``"interactive"`` (the default) is routed by the watchdog's
        state; ``"bulk"`` goes to the bulk lane of ``queue`` (default: the model's queue), never shed or passed
        through. A ``model`` among the job's arguments picks the served model (tasks/models.py): it chooses the
        queue and is not sent; an unknown one raises ``UnknownModel`` here, before anything is queued."""
        served, named = _served_model(kwargs)
        if isinstance(kwargs, dict) and "model" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "model"}
        _refuse_oversized(args, kwargs)
        self.sync_clock()
        explicit = any(options.get(name) for name in _DESTINATION_OPTIONS)
        if lanes.check(lane) == lanes.BULK:
            options["queue"] = lanes.queue_for(options.get("queue") or served.queue, lanes.BULK)
            options.pop("routing_key", None)
        elif not explicit:
            destination = self.get_router(served).route()
            if destination == PASSTHROUGH:
                return self._passthrough(args, kwargs, options.get("task_id"))
            options["queue"] = destination
        # Named, to its own queue (not shed: the fast ranker answers for any model): its name and path go along, for
        # the worker to check (worker/consumer.py, Misrouted).
        if named and options.get("queue") in (served.queue, lanes.queue_for(served.queue, lanes.BULK)):
            options["headers"] = {**(options.get("headers") or {}), MODEL_HEADER: [served.name, served.path]}
        try:
            return super().apply_async(args, kwargs, **options)
        except Exception as exc:
            if memory.is_full(exc):
                raise memory.refused(exc, broker_shown(self.app)) from exc
            raise

    def sync_clock(self) -> None:
        """Measure this process's offset from Redis's clock, if due (tasks/clock.py)."""
        clock.sync(self._clock_client)

    def _clock_client(self) -> Any:
        if self._clock_broker is None:
            self._clock_broker = BrokerRedis(self.app)
        return self._clock_broker.client

    def get_router(self, model: ServedModel | None = None) -> Router:
        """The router of ``model``'s queue (default: the default model's, ``router``), made on first use."""
        from rerankq.celeryconfig import settings

        model = model or settings.served.default
        if model == settings.served.default:
            if self.router is None:
                self.router = self._router_for(model)
            return self.router
        if model.name not in self._routers:
            self._routers[model.name] = self._router_for(model)
        return self._routers[model.name]

    def _router_for(self, model: ServedModel) -> Router:
        from rerankq.celeryconfig import settings

        return Router(lambda: BrokerRedis(self.app), model.queue, model.fallback, settings.route_cache_ms / 1000,
                      settings.passthrough)

    def _passthrough(self, args: Any, kwargs: Any, task_id: str | None) -> EagerResult:
        from rerankq.celeryconfig import settings

        task_id = task_id or str(uuid.uuid4())
        try:
            result = passthrough_result(args, kwargs, settings.max_docs, settings.max_query_chars)
        except BadJob as exc:
            return EagerResult(task_id, exc, states.FAILURE, name=self.name)
        return EagerResult(task_id, result.to_dict(), states.SUCCESS, name=self.name)


@before_task_publish.connect(weak=False)
def _stamp_sent_at(sender: str | None = None, headers: dict[str, Any] | None = None, routing_key: str = "",
                   **_: Any) -> None:
    """Stamp a job's send time as it is published, after Celery has built its message and subscribed to its
    result: what the queue wait counts from (the caller's whole wait is the job's latency). With tracing set
    up, the send is a span whose context the message carries."""
    if sender == TASK_NAME and headers is not None:
        headers.setdefault(SENT_AT_HEADER, clock.now())  # a relay may pass on the original send time
        tracing.sending(headers, str(headers.get("id", "")), routing_key)


def _served_model(kwargs: Any) -> tuple[ServedModel, bool]:
    """The served model a job names (its ``model`` argument), or the default; ``UnknownModel`` for one not
    served. And whether it named a served one (by name, alias or path): not omitted, nor an unknown name answered
    by the default (RERANKQ_UNKNOWN_MODEL=default)."""
    from rerankq.celeryconfig import settings

    name = kwargs.get("model") if isinstance(kwargs, dict) else None
    return settings.served.resolve(name), isinstance(name, str) and settings.served.find(name) is not None


def _refuse_oversized(args: Any, kwargs: Any) -> None:
    """Refuse a job too large to send, here, before it weighs on Redis and every worker that reads it: its query
    over RERANKQ_MAX_QUERY_CHARS, or the whole over RERANKQ_MAX_JOB_BYTES."""
    from rerankq.celeryconfig import settings

    query = (kwargs or {}).get("query") if isinstance(kwargs, dict) else None
    if query is None and isinstance(args, list | tuple) and args:
        query = args[0]
    if isinstance(query, str):  # an empty one or another type is the worker's to refuse, in the job's result
        check_query_length(query, settings.max_query_chars)

    try:
        size = len(json.dumps([args, kwargs], ensure_ascii=False).encode())
    except (TypeError, ValueError):
        return  # not JSON: Celery's own encoding error says so
    if size > settings.max_job_bytes:
        raise BadJob(f"this job is {size} bytes of JSON, over RERANKQ_MAX_JOB_BYTES={settings.max_job_bytes}: "
                     "send fewer or shorter docs (the model truncates each pair to RERANKQ_MAX_LENGTH tokens "
                     "anyway), or split the job")


@app.task(base=RerankTask, name=TASK_NAME, shared=False)
def rerank(query: str, docs: list[str], top_k: int | None = None, deadline: float | None = None,
           raw_scores: bool = False, long_docs: str | None = None, model: str | None = None,
           instruction: str | None = None) -> Any:
    """Score ``docs`` against ``query``; ``.get()`` returns a ``Result`` dict (scores in input order). ``model``
    (a served name; the default model if None) picks the queue as the job is sent, and is not sent."""
    raise RerankError(
        "rerank jobs are scored together in forward batches by `rerankq worker`; they cannot run eagerly or in a "
        "worker started without rerankq's chunk consumer")
