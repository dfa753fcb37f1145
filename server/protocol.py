"""The HTTP protocol ``rerankq serve`` runs under uvicorn (its ``http`` option: the class it makes per
connection), with a deadline for reading each request.

uvicorn times out only idle keep-alive connections: a client that opens a connection and sends nothing, or
its headers a byte at a time, holds it for good, and 1,100 such connections (no API key needed) made
``/health`` time out with "Too many open files". Here a request must arrive whole, headers and body, within
``read_timeout_s`` of its first byte (of the connection opening, for the first); otherwise the client is
answered 408 and the connection closed. A request that has arrived is not timed here: its wait for a result
is ``RERANKQ_SERVE_TIMEOUT_S``. Between requests, uvicorn's keep-alive timeout closes an idle connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

_BODY = b'{"message":"request not received in time","error":"request not received in time","error_type":"http"}'
TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


def with_read_deadline(read_timeout_s: float, base: type[Any] = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's h11 protocol, or httptools' where installed), answering 408 and closing a connection
    whose request has not fully arrived within ``read_timeout_s`` of its first byte."""

    class ReadDeadline(base):  # type: ignore[misc,valid-type]
        _read_timer: asyncio.TimerHandle | None = None
        #: The last request was answered: the next one's deadline starts with its first byte.
        _between = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between:
                self._between = False
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()
            self._between = True

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
            self._read_timer = None
            cycle = self.cycle
            new = cycle is None or cycle.response_complete  # its headers not in yet
            if not (new or cycle.more_body) or self.transport.is_closing():
                return  # arrived whole: being answered
            if new or not cycle.response_started:
                self.transport.write(TIMED_OUT)
            self.transport.close()

    return ReadDeadline
