"""The HTTP protocol ``rerankq serve`` runs under uvicorn (its ``http`` option: the class it makes per
connection), with a deadline for reading each request.

uvicorn times out only idle keep-alive connections: a client that opens a connection and sends nothing, or
its headers a byte at a time, holds it for good, and 1,100 such connections (no API key needed) made
``/health`` time out with "Too many open files". Here each request must arrive whole, headers and body,
within ``read_timeout_s`` of the connection opening or of the answer before it; otherwise the connection
is closed. A request that has arrived is not timed here: its wait for a result is ``RERANKQ_SERVE_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def with_read_deadline(read_timeout_s: float, base: type[Any] = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's h11 protocol, or httptools' where installed), closing a connection whose request
    has not fully arrived within ``read_timeout_s``."""

    class ReadDeadline(base):  # type: ignore[misc,valid-type]
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            # Reading: no request yet (or only the last one, answered), or one whose body is still coming.
            cycle = self.cycle
            if (cycle is None or cycle.response_complete or cycle.more_body) and not self.transport.is_closing():
                self.transport.close()

    return ReadDeadline
