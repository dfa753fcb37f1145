"""Redis Sentinel: every connection to the master leaves it once the sentinels name another.

redis-py asks the sentinels for the master only when it opens a connection. After a planned failover
(``SENTINEL FAILOVER``) the old master stays up and keeps accepting writes until the sentinels make it a
replica, about ten seconds later; meanwhile a connection already open to it sends there the jobs a producer
publishes (lost when it resyncs), the acks a worker writes (the jobs are served again) and the results (their
callers never see them). ``MasterCheckedConnection`` asks the sentinels again before a command at most
every ``CHECK_S`` and, once they name another master, sends the command there (the connection kombu's
receive polls fails it as a lost connection instead, and Celery's consumer reconnects). The sentinels name
the new master about a second after the failover starts: for no loss at all, pause writes on the old master
for longer than that (RELIABILITY.md).

Every rerankq process gets these classes by extension points, not by patching: kombu's channel through the
transport class (Celery's ``broker_transport``), Celery's result backend through its loader's
``override_backends`` (``tasks/app.py``), and ``Connection`` keeps that transport when kombu moves to the next
sentinel URL (Celery's ``amqp`` class).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
import redis.sentinel
from celery.app import amqp
from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis

from rerankq.tasks import clock

#: How often, at most, a connection asks the sentinels which server is master (one round trip to a sentinel).
CHECK_S = 1.0

logger = logging.getLogger(__name__)


class MasterCheckedConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the master the sentinels name, which fails its next command as a lost connection once they
    name another (redis-py asks them only as it connects, or when a write is refused as ``READONLY``)."""

    _checked_at = float("-inf")
    #: Whether it reconnects to the new master and sends the command there. A connection kombu's receive polls
    #: fails the command as a lost one instead, which Celery's consumer reconnects after: the poller watches
    #: the socket, and would go on watching the closed one.
    moves_quietly = True

    def connect_to(self, address: Any) -> None:
        super().connect_to(address)
        self._checked_at = time.monotonic()  # the sentinels were just asked

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock is None:
            self.connect()  # through the sentinels: redis-py 8 reconnects a retried command to its last address
        elif time.monotonic() - self._checked_at >= CHECK_S:
            self._checked_at = time.monotonic()
            self._leave_a_former_master()
        super().send_packed_command(command, check_health)

    def _leave_a_former_master(self) -> None:
        pool = self.connection_pool
        if not pool.is_master:
            return
        try:
            # Also closes the pool's idle connections when the master changed (redis-py's own bookkeeping).
            master = pool.get_master_address()
        except redis.RedisError:
            return  # no sentinel answers: this connection's own commands say whether its server does
        if (self.host, self.port) != tuple(master):
            former = (self.host, self.port)
            _say_moved(pool.service_name, former, tuple(master))
            clock.measure_again()  # another server, another clock
            self.disconnect()
            if not self.moves_quietly:
                raise redis.ConnectionError(f"the sentinels name {master[0]}:{master[1]} master of "
                                            f"{pool.service_name!r}, no longer {former[0]}:{former[1]}")
            self.connect()  # asks the sentinels (a plain reconnect would go back to the address it had)


_told: set[tuple[Any, ...]] = set()


def _say_moved(name: str, former: tuple[Any, ...], master: tuple[Any, ...]) -> None:
    """Log a move once per process, not once per connection."""
    if (former, master) not in _told:
        _told.add((former, master))
        logger.warning("the sentinels name %s:%s master of %r, no longer %s:%s: moving there", *master, name,
                       *former)


class SentinelChannel(kombu_redis.SentinelChannel):
    connection_class = MasterCheckedConnection

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)
        if asynchronous:  # the connections kombu's poller watches
            params["connection_class"] = type("PolledConnection", (params["connection_class"],),
                                              {"moves_quietly": False})
        return params


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class SentinelBackend(CelerySentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel result backend, its connections ``MasterCheckedConnection``s."""

    def _get_sentinel_instance(self, **params: Any) -> Any:
        return super()._get_sentinel_instance(**{"connection_class": MasterCheckedConnection, **params})


class Connection(KombuConnection):  # type: ignore[misc]
    """kombu's connection, keeping the transport it was given (by path) when it moves to the next of several URLs
    (``sentinel://a;sentinel://b``, on a failover): kombu's ``switch`` takes the transport from the URL's
    scheme, which would put the connection back on kombu's own transport."""

    def switch(self, conn_str: str) -> None:
        super().switch(conn_str)
        given = self._initial_params.get("transport")
        if given:
            self.transport_cls = given


class AMQP(amqp.AMQP):  # type: ignore[misc]
    """Celery's broker side of rerankq's app, its connections ``Connection``s (Celery's ``amqp`` class)."""

    Connection = Connection

