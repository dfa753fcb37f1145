"""Requests whose client went away are cancelled: their job is dropped before its first forward batch.

An ASGI middleware around the rerank routes. Once a request's body has arrived, it listens for the client's
disconnect (uvicorn's ``http.disconnect``) while the handler waits for its result; on one, it cancels the handler.
The handler's ``arerank`` then revokes the job (producer/client.py), and workers drop it at admission
(worker/runner.py) instead of scoring it for nobody. vLLM's ``/rerank`` went on computing after its client left
(vllm#55502).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        arrived = asyncio.Event()  # the whole body: from then on, the next message can only be the disconnect
        answering = False

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                arrived.set()
            return message

        async def sending(message: Message) -> None:
            nonlocal answering
            answering = True  # an answer under way is not cut short
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receiving, sending))
        watcher = asyncio.ensure_future(self._watch(arrived, receive, handler, lambda: answering))
        try:
            await handler
        except asyncio.CancelledError:
            left = watcher.done() and not watcher.cancelled() and watcher.exception() is None and watcher.result()
            if not left:
                raise  # cancelled from outside (the server stopping), not by the client leaving
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the answer is sent: nothing to tell
                await watcher

    @staticmethod
    async def _watch(arrived: asyncio.Event, receive: Receive, handler: asyncio.Future[None],
                     answering: Callable[[], bool]) -> bool:
        """Whether it cancelled ``handler`` because the client disconnected while it waited for its result."""
        await arrived.wait()
        while not handler.done():
            message = await receive()
            if message["type"] == "http.disconnect":
                if handler.done() or answering():
                    return False
                handler.cancel()
                return True
        return False
