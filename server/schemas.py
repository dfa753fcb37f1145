"""The request and response bodies ``rerankq serve`` speaks: Cohere's and Jina's rerank API, and TEI's.

Field names, defaults and shapes are those services' own, so their clients work unchanged. ``model`` picks a
served model (tasks/models.py; the default when absent), on every endpoint. Fields a client may send that
rerankq has no use for (Cohere's ``rank_fields``, ``max_tokens_per_doc``, ``priority``) are accepted and
ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from rerankq.celeryconfig import settings
from rerankq.tasks.records import REFUSE, SPLIT, TRUNCATE, TRUNCATE_LEFT

LongDocs = Literal["truncate", "truncate-left", "split", "refuse"]

#: A list over this process's RERANKQ_MAX_DOCS is refused before any of its items is looked at: validated item
#: by item, 2 MB of ``[0,0,...]`` made an error per item, a 300 MB answer. (``check_request`` then applies the
#: app's own settings.)
MAX_ITEMS = settings.max_docs


class _Strict(BaseModel):
    # A number is not a document and "3" is not a top_n; unknown fields are ignored.
    model_config = ConfigDict(strict=True)


class Document(_Strict):
    text: str


class RerankRequest(_Strict):
    """Cohere's ``POST /v1/rerank`` (and ``/v2/rerank``), Jina's ``POST /v1/rerank``."""

    query: str
    #: A served model's name or alias (``GET /v1/models``); the deployment's default when absent.
    model: str | None = None
    #: What an LLM reranker judges by (vLLM's name; the model's default when absent); a cross-encoder refuses one.
    instruction: str | None = None
    #: Strings, or objects with a ``text``.
    documents: Annotated[list[str | Document], Field(max_length=MAX_ITEMS)]
    #: Only the best ``top_n`` results; all of them when absent.
    top_n: int | None = Field(default=None, ge=1)
    #: Echo each result's document.
    return_documents: bool = False
    #: rerankq's own: what becomes of a document longer than the model reads (RERANKQ_LONG_DOCS by default).
    long_docs: LongDocs | None = None
    #: Cohere v1's: given, long documents are split into windows (their number is RERANKQ_MAX_WINDOWS).
    max_chunks_per_doc: int | None = Field(default=None, ge=1)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def long_docs_mode(self) -> str | None:
        return self.long_docs or (SPLIT if self.max_chunks_per_doc is not None else None)


class RerankResult(BaseModel):
    #: Position of the document in the request's ``documents``.
    index: int
    relevance_score: float
    document: Document | None = None


class Meta(BaseModel):
    """Where Cohere's responses carry their ``meta``: which ranker answered, and how long it took."""

    #: "cross-encoder"; "fast" when load was shed to the fast ranker; "passthrough" when both queues were over
    #: their marks and the documents came back in the order they were sent.
    ranker: str
    model: str
    passthrough: bool
    queue_ms: float
    inference_ms: float


class RerankResponse(BaseModel):
    id: str
    #: Best first.
    results: list[RerankResult]
    meta: Meta


def _direction(value: Any) -> Any:
    # TEI's enum reads "Right"/"Left"; its clients send either case.
    return value.lower() if isinstance(value, str) else value


class TeiRerankRequest(_Strict):
    """text-embeddings-inference's ``POST /rerank``."""

    query: str
    texts: Annotated[list[str], Field(max_length=MAX_ITEMS)]
    #: rerankq's own (TEI serves one model): a served model's name or alias; the default when absent.
    model: str | None = None
    #: As Cohere's shape's ``instruction``.
    instruction: str | None = None
    #: The model's logits instead of its scores after the sigmoid.
    raw_scores: bool = False
    return_text: bool = False
    #: False: an input over the model's length is refused (422); true: truncated; absent: the deployment's
    #: RERANKQ_LONG_DOCS (truncation by default, as TEI's ``--auto-truncate``).
    truncate: bool | None = None
    truncation_direction: Annotated[Literal["right", "left"], BeforeValidator(_direction)] = "right"

    def long_docs_mode(self) -> str | None:
        if self.truncate is False:
            return REFUSE
        if self.truncation_direction == "left":
            return TRUNCATE_LEFT
        return TRUNCATE if self.truncate else None


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


def _shape(body: Any) -> str:
    return "tei" if isinstance(body, dict) and "texts" in body else "cohere"


#: ``POST /rerank`` takes either shape: TEI's when the body has ``texts``, else Cohere's.
AnyRerankRequest = Annotated[
    Annotated[RerankRequest, Tag("cohere")] | Annotated[TeiRerankRequest, Tag("tei")], Discriminator(_shape)]


Status = Literal["ok", "degraded", "unavailable"]


class ModelHealth(BaseModel):
    """One served model's verdict, as ``Health`` gives the default model's."""

    status: Status
    reason: str
    route: str
    queue: str


class Health(BaseModel):
    #: "ok": a live worker serves the queue new jobs go to; "degraded": answering from the fast ranker or in
    #: retrieval order while the GPU queue is over its marks, or another served model is not ok (``models``
    #: says which); "unavailable": the default model is not answering (503).
    status: Status
    reason: str
    route: str
    #: Live workers per queue.
    workers: dict[str, int]
    #: Each served model's own verdict, by name.
    models: dict[str, ModelHealth] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """A served model in ``GET /v1/models`` (OpenAI's ``Model`` object, with rerankq's own fields after)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "rerankq"
    aliases: list[str]
    #: Its health verdict (``ModelHealth.status``), and its queue's live workers.
    status: Status
    live_workers: int
    default: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Error(BaseModel):
    """Every error answer: ``message`` is where Cohere's clients look, ``error`` and ``error_type`` TEI's."""

    message: str
    error: str
    error_type: str
    #: The request field at fault, where one is (``model`` for a model not served: OpenAI's and vLLM's name).
    param: str | None = None
