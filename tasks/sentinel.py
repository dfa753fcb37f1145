"""Redis Sentinel: every connection to the master leaves it once the sentinels name another.

redis-py asks the sentinels for the master only when it opens a connection. After a planned failover
(``SENTINEL FAILOVER``) the old master stays up and keeps accepting writes until the sentinels make it a
replica, about ten seconds later; meanwhile a connection already open to it sends there the jobs a producer
publishes (lost when it resyncs), the acks a worker writes (the jobs are served again) and the results (their
callers never see them). A thread of each process asks the sentinels every ``CHECK_S`` which server is
master, for each of its pools; a ``MasterCheckedConnection`` to another server fails its next command as a
lost connection, and whoever sent it reconnects, to the new master. The sentinels name the new master about
a second after the failover starts: for no loss at all, pause writes on the old master for longer than that
(RELIABILITY.md).

Every rerankq process gets these classes by extension points, not by patching: kombu's channel through the
transport class (Celery's ``broker_transport``), Celery's result backend through its loader's
``override_backends`` (``tasks/app.py``), and ``Connection`` keeps that transport when kombu moves to the next
sentinel URL (Celery's ``amqp`` class).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

import redis
import redis.sentinel
from celery.app import amqp
from celery.backends.redis import SentinelBackend as CelerySentinelBackend
from kombu.connection import Connection as KombuConnection
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rerankq.tasks import clock

#: How often a process asks the sentinels which server is master, for each of its connection pools.
CHECK_S = 1.0

logger = logging.getLogger(__name__)


class MasterMoved(redis.ConnectionError):
    """The sentinels name another master than the one this connection reaches."""


class MasterCheckedConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the master the sentinels name, which fails its next command as a lost connection once they
    name another (redis-py asks them only as it connects, or when a write is refused as ``READONLY``).

    Failing, not moving quietly: a pipeline under ``WATCH`` then raises ``WatchError`` instead of running its
    ``EXEC`` on the new master unwatched; Celery's result listener subscribes again and reads the results it may
    have missed; kombu's receive reconnects (its poller watches the socket). A plain command is sent again once,
    to the new master (``MasterMoved`` is retried where nothing else is)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.retry.get_retries() == 0:  # kombu's connections: no retry of their own
            self.retry = Retry(NoBackoff(), 1, supported_errors=(MasterMoved,))
        _masters.watch(self.connection_pool)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock is None:
            self.connect()  # through the sentinels: redis-py 8 reconnects a retried command to its last address
        else:
            master = _masters.named(self.connection_pool)
            if master is not None and (self.host, self.port) != master:
                former = (self.host, self.port)
                self.disconnect()
                raise MasterMoved(f"the sentinels name {master[0]}:{master[1]} master of "
                                  f"{self.connection_pool.service_name!r}, no longer {former[0]}:{former[1]}")
        super().send_packed_command(command, check_health)


class _Masters:
    """The master the sentinels name for each pool of this process, asked every ``CHECK_S`` by one thread: a
    sentinel that hangs delays that thread, never a command."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._named: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._pid = 0

    def watch(self, pool: Any) -> None:
        if not pool.is_master:
            return
        with self._lock:
            self._pools.add(pool)
            if self._pid != os.getpid():  # the first pool, or the first in a forked child (threads do not fork)
                self._pid = os.getpid()
                threading.Thread(target=self._loop, name="rerankq-sentinels", daemon=True).start()

    def named(self, pool: Any) -> tuple[Any, Any] | None:
        return self._named.get(pool)

    def _loop(self) -> None:
        while True:
            time.sleep(CHECK_S)
            with self._lock:
                pools = list(self._pools)
            for pool in pools:
                try:
                    # redis-py's own call: also closes the pool's idle connections when the master changed.
                    master = tuple(pool.get_master_address())
                except Exception:  # no sentinel answers: the connections' own commands say the rest
                    continue
                former = self._named.get(pool)
                self._named[pool] = master  # type: ignore[assignment]
                if former is not None and former != master:
                    logger.warning("the sentinels name %s:%s master of %r, no longer %s:%s: moving there", *master,
                                   pool.service_name, *former)
                    clock.measure_again()  # another server, another clock


_masters = _Masters()


class SentinelChannel(kombu_redis.SentinelChannel):
    connection_class = MasterCheckedConnection


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

