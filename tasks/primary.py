"""A Redis reached by one address: every connection leaves a server that was made a replica in place.

Failover by DNS or a virtual IP (a cloud's primary endpoint, keepalived) moves the address to the new
primary and demotes the old one in place, and every connection already open stays on the old one. It answers
each write with ``READONLY`` (``UNBLOCKED`` to a command blocked in ``BLMOVE``), and redis-py keeps the
connection: a worker's receive failed as a channel error and Celery stopped the worker, its acks and results
were refused on the same socket (a job answered, its ack refused, was served again), the watchdog's and the
stats thread's writes failed on it for good. A ``PrimaryConnection`` drops itself on those replies and fails
the command as a lost connection (``Demoted``), as redis-py's Sentinel connections do: whoever sent it
reconnects, through the address, to whichever server holds it now, and retries where it retries a lost
connection (kombu's send, Celery's result writes, the settler's acks).

Every rerankq process gets these classes by extension points, as with Sentinel (``tasks/sentinel.py``):
kombu's channel through the transport class (Celery's ``broker_transport``; a worker's channel derives from
this one), Celery's result backend through its loader's ``override_backends`` (``tasks/app.py``). A Unix socket
names one server: its connections stay redis-py's.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

#: What a master made a replica answers a client blocked on it (redis-py's Sentinel connections read it too).
UNBLOCKED = "UNBLOCKED force unblock from blocking operation, instance state changed"
#: A write refused by a replica: redis-py's ``ReadOnlyError``, or inside a script's error before Redis 7; and a
#: transaction whose server became a replica while it was queued (``EXEC`` aborted, nothing run).
READONLY = "READONLY You can't write against a read only"
EXEC_ABORTED = "instance is now a read-only replica"


class Demoted(redis.ConnectionError):
    """The server this connection reached was made a replica: the connection is dropped, the next one goes
    through the address again. The refused command did not run, but those before it in a pipeline may have:
    it is sent again only where a lost connection's command would be."""


class OpenedBefore(Demoted):
    """This connection was opened before its process last met a demoted server, and nothing was sent on it: the
    command is sent again once, reconnected, where the connection has no retries of its own (kombu's)."""


def demoted(error: redis.ResponseError) -> bool:
    """Whether ``error`` is a replica's refusal of a write, or its release of a blocked command."""
    text = str(error)
    return (isinstance(error, redis.ReadOnlyError) or text.startswith(UNBLOCKED) or READONLY in text
            or EXEC_ABORTED in text)


class _Demotions:
    """How many times a connection of this process met a demoted server. Threads count without a lock: an
    increment lost to another's leaves the count changed all the same, which is all a connection reads."""

    seen = 0


class Checked(AbstractConnection):
    """Turns a demoted server's replies into ``Demoted`` on a redis-py connection class it is mixed into; and a
    connection opened before this process last met one leaves its server before its next command, as the
    server may be the demoted one: a connection that only publishes (Celery's heartbeats and events) is never
    refused by a replica, and stayed on it for good, the worker missing from Flower."""

    #: The socket this connection last sent on, and the count of demotions met when it was opened.
    _marked: Any = None
    _generation = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.retry.get_retries() == 0:
            self.retry = Retry(NoBackoff(), 1, supported_errors=(OpenedBefore,))

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        known, seen = self._sock is not None and self._sock is self._marked, _Demotions.seen
        # Not inside a send (redis-py's health-check PING, and a subscriber's commands, come without a check of
        # their own): moved there, the command around it would go out on a socket its poller does not watch.
        if known and check_health and self._generation != seen:
            self.disconnect()
            raise OpenedBefore(f"{self._address()} was reached before a server was found demoted; reconnecting")
        super().send_packed_command(command, check_health)
        if not known:  # opened now, or since its last command: current as of before this send
            self._marked, self._generation = self._sock, seen

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as error:
            if not demoted(error):
                raise
            _Demotions.seen += 1
            address = self._address()
            self.disconnect()
            raise Demoted(f"{address} is a replica now ({error}); reconnecting through its address") from error

    def _address(self) -> str:
        return f"{getattr(self, 'host', '?')}:{getattr(self, 'port', '?')}"


class PrimaryConnection(Checked, redis.Connection):
    pass


class PrimarySSLConnection(Checked, redis.SSLConnection):
    pass


class Channel(kombu_redis.Channel):
    connection_class = PrimaryConnection
    connection_class_ssl = PrimarySSLConnection


class Transport(kombu_redis.Transport):
    Channel = Channel


class Backend(RedisBackend):
    """Celery's Redis result backend, its TCP connections ``PrimaryConnection``s."""

    connection_class_ssl = PrimarySSLConnection

    def _params_from_url(self, url: str, defaults: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = super()._params_from_url(url, defaults)
        given = params.get("connection_class")  # None: redis-py's TCP one; a Unix socket's is kept
        params["connection_class"] = {None: PrimaryConnection, redis.Connection: PrimaryConnection,
                                      redis.SSLConnection: PrimarySSLConnection}.get(given, given)
        return params
