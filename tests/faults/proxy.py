"""A TCP proxy that can make a Redis go silent on the connections open at the time, as when its host dies
or a failover moves its address, while new connections reach it; or move its address to another Redis, as
failover by DNS or a virtual IP does, the connections open at the time left where they are."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from rerankq.redis_server import free_port


class BlackHoleProxy:
    """Forwards TCP to ``target``; ``swallow()`` makes every connection open now go silent in both directions
    (held open, nothing passed on), while connections made afterwards are forwarded as before; ``point(port)``
    forwards the connections made afterwards to ``port``."""

    def __init__(self, target_port: int) -> None:
        self.port, self._target = free_port(), target_port
        self._generation = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self) -> None:
        self._generation += 1

    def point(self, target_port: int) -> None:
        self._target = target_port

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, self._generation), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, generation: int) -> None:
        try:
            while data := source.recv(65536):
                while generation != self._generation:  # swallowed: hold the connection, pass nothing on
                    time.sleep(3600)
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # closed on one side: closed on the other, as without a proxy
            sink.shutdown(socket.SHUT_WR)
