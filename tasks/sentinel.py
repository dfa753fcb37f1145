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

import contextlib
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
    """The sentinels name another master than the one this connection reaches: sent again once, to the new one."""


class MasterMovedUnderSubscriber(redis.ConnectionError):
    """The same, on a pub/sub connection: never sent again quietly, so that its owner subscribes again and reads
    what it may have missed (Celery's result listener does, on a connection error)."""


class MasterCheckedConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the master the sentinels name, which fails its next command as a lost connection once they
    name another (redis-py asks them only as it connects, or when a write is refused as ``READONLY``).

    Failing, not moving quietly: a pipeline under ``WATCH`` fails instead of running its ``EXEC`` on the new
    master unwatched; Celery's result listener subscribes again and reads the results it may have missed;
    kombu's receive reconnects (its poller watches the socket). A plain command is sent again once, to the new
    master (``MasterMoved`` is retried where nothing else is)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.retry.get_retries() == 0:  # kombu's connections: no retry of their own
            self.retry = Retry(NoBackoff(), 1, supported_errors=(MasterMoved,))
        _masters.watch(self.connection_pool)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sock is None:
            self.connect()  # through the sentinels: redis-py 8 reconnects a retried command to its last address
        else:
            # The pool's master: set as any of its connections connects, and by the thread below.
            master = self.connection_pool.master_address
            if master is not None and (self.host, self.port) != tuple(master):
                former = (self.host, self.port)
                self.disconnect()
                subscriber = bool(getattr(self, "_connect_callbacks", None))  # redis-py's pub/sub registers one
                raise (MasterMovedUnderSubscriber if subscriber else MasterMoved)(
                    f"the sentinels name {master[0]}:{master[1]} master of {self.connection_pool.service_name!r}, "
                    f"no longer {former[0]}:{former[1]}")
        super().send_packed_command(command, check_health)


class _Masters:
    """Asks the sentinels every ``CHECK_S`` which server is master, once for each set of sentinels and master
    name this process's pools use, by one thread: a sentinel that hangs delays that thread, never a command. A
    pool whose master changed learns it (``get_master_address``, which also closes its idle connections)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a lock held by the parent's thread would stay held

    def _reset(self) -> None:
        self._pools: list[weakref.ref[Any]] = []
        self._lock = threading.Lock()
        self._started = False

    def watch(self, pool: Any) -> None:
        if not pool.is_master:
            return
        with self._lock:
            if not any(ref() is pool for ref in self._pools):
                self._pools.append(weakref.ref(pool))
            if not self._started:
                self._started = True
                threading.Thread(target=self._loop, name="rerankq-sentinels", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(CHECK_S)
            try:
                self._check()
            except Exception:  # a bug must not end the checks for good, silently
                logger.exception("could not ask the sentinels which server is master; trying again")

    def _check(self) -> None:
        with self._lock:
            self._pools = [ref for ref in self._pools if ref() is not None]
            pools = [pool for ref in self._pools if (pool := ref()) is not None]
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for pool in pools:
            sentinels = frozenset((s.connection_pool.connection_kwargs.get("host"),
                                   s.connection_pool.connection_kwargs.get("port"))
                                  for s in pool.sentinel_manager.sentinels)
            groups.setdefault((sentinels, pool.service_name), []).append(pool)
        for group in groups.values():
            try:
                master = tuple(group[0].sentinel_manager.discover_master(group[0].service_name))
            except Exception:  # no sentinel answers: the connections' own commands say the rest
                continue
            moved = [pool for pool in group if pool.master_address is not None and tuple(pool.master_address) != master]
            for pool in moved:
                former = tuple(pool.master_address)
                with contextlib.suppress(Exception):
                    pool.get_master_address()
            if moved:
                logger.warning("the sentinels name %s:%s master of %r, no longer %s:%s: moving there", *master,
                               group[0].service_name, *former)
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

