"""What ``rerankq serve`` refuses before anything reaches Redis: a body too large (413), a request over the
documents or characters limits (422), a missing or wrong API key (401)."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankq.celeryconfig import Settings
from rerankq.server.errors import Unauthorized, error
from rerankq.tasks.errors import BadJob
from rerankq.tasks.records import check_query


def check_request(settings: Settings, query: str, texts: list[str], instruction: str | None = None) -> None:
    """The request's own limits, as ``BadJob`` (422) saying which and how to fit."""
    check_query(query, settings.max_query_chars)
    _unicode("the query", query)
    if instruction is not None:
        if len(instruction) > settings.max_query_chars:
            raise BadJob(f"the instruction is {len(instruction)} characters, over the limit of "
                         f"{settings.max_query_chars} (RERANKQ_MAX_QUERY_CHARS bounds it as it bounds the query)")
        _unicode("the instruction", instruction)
    if len(texts) > settings.max_docs:
        raise BadJob(f"{len(texts)} documents is over the limit of {settings.max_docs} per request "
                     "(RERANKQ_MAX_DOCS): split the request")
    for i, text in enumerate(texts):
        if len(text) > settings.max_doc_chars:
            raise BadJob(f"document {i} is {len(text)} characters, over the limit of {settings.max_doc_chars} "
                         "(RERANKQ_MAX_DOC_CHARS): the model reads only its first RERANKQ_MAX_LENGTH tokens anyway")
        _unicode(f"document {i}", text)


def _unicode(what: str, text: str) -> None:
    """JSON lets a string hold half of a surrogate pair (``"\\ud800"``), which is no character: it could not be
    written back in an answer (a 500 once scored), so it is refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadJob(f"{what} is not valid Unicode text: a lone surrogate at character {exc.start} (send UTF-8 "
                     "text; a surrogate escape in JSON must come in a pair)") from None


def check_token(settings: Settings, request: Request) -> None:
    """``Authorization: Bearer <RERANKQ_SERVE_API_KEY>`` (how Cohere's, Jina's and TEI's clients send a key)."""
    if not settings.serve_api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.serve_api_key.encode()):
        raise Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                           "the server has in RERANKQ_SERVE_API_KEY")


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 and never parsed: by its Content-Length
    before a byte is read, or as soon as what arrived passes the limit (sent chunked, or with a Content-Length
    that understates it). A request that carries both Content-Length and Transfer-Encoding is answered 400:
    the two disagree on where the body ends (RFC 9112 6.3: request smuggling), and the server read a 40 MB
    chunked body whole under ``Content-Length: 10``."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...]) -> None:
        #: Only these paths' bodies are read (the others' routes read none), and only once the request got past
        #: the API key check, which runs before this middleware.
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # And the connection closed (RFC 9112 6.3): what follows on it cannot be told apart from this body.
            await _answer(send, error(400, "bad_request", "the request has both Content-Length and "
                                      "Transfer-Encoding: send one of them", CLOSE))
            return
        if scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        # Read it here, counting what arrives (the app would hold it whole to parse it anyway), then replay it.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send: Send) -> None:
        # Closed after: the rest of the body, unread, is still on the connection.
        await _answer(send, error(413, "payload_too_large", f"the request body is over the limit of {self.max_bytes} "
                                  "bytes (RERANKQ_SERVE_MAX_BODY_BYTES): send fewer or shorter documents, or split "
                                  "the request", CLOSE))


CLOSE = {"connection": "close"}


async def _answer(send: Send, response: Any) -> None:
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}
