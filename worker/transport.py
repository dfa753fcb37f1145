"""kombu's Redis transport, receiving with ``BLMOVE`` so that a killed worker never loses a job in transit.

kombu pops a job with ``BRPOP`` and only then records it in its unacked hash: a worker killed between
the two, with the reply in its socket, loses that job (the soak in RELIABILITY.md lost one in about
6,000 over eight kills). Here the job moves atomically into this worker's in-flight list
(worker/inflight.py), and its unacked record and its removal from that list are one ``MULTI``. Everything
else is kombu's: acks, the visibility timeout, restoring unacked jobs.

``BLMOVE`` takes one source list, so this applies to a worker consuming one queue (rerankq's workers
do; ``priority_steps`` is ``[0]``, one list per queue). A worker given several queues receives as
kombu does, and says so once; so does a worker on Redis older than 6.2, which has no ``BLMOVE``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker import inflight

logger = logging.getLogger(__name__)

#: Names this process's in-flight lists: the Celery node name once the worker knows it.
_owner = f"{socket.gethostname()}-{os.getpid()}"


_REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        receiving = self.channel.receiving
        if receiving is None:
            super().append(message, delivery_tag)
            return
        key, raw = receiving
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            # kombu's own unacked record, and the job off the in-flight list, in one transaction.
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag,
                      dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            pipe.lrem(key, 1, raw)
            pipe.execute()
        self.channel.receiving = None
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: (queue, source list, in-flight list) of the BLMOVE outstanding, if any.
    _moving: tuple[str, str, str] | None = None
    #: (in-flight list, raw message) while a moved job is being delivered.
    receiving: tuple[str, bytes] | None = None
    _can_move = True

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # Before the first receive: take back what a worker of the same name left in flight.
        source, key = self._source(queue), inflight.list_key(self.global_keyprefix, _owner, queue)
        restored = inflight.adopt(self._plain_client(), self.global_keyprefix, key, source)
        if restored:
            logger.warning("put back %d job(s) a previous worker named %s left in flight", restored, _owner)
        if len(self.active_queues) == 1:
            logger.warning("consuming several queues: jobs are received with BRPOP, and a worker killed "
                           "while receiving one can lose it; run one queue per worker")
        self._can_move = _has_blmove(self._plain_client())
        return super().basic_consume(queue, *args, **kwargs)

    def _source(self, queue: str) -> str:
        return f"{self.global_keyprefix}{self._q_for_pri(queue, 0)}"

    def _plain_client(self) -> redis.Redis:
        """A client on kombu's pool that does not prefix keys (ours carry the prefix already)."""
        return redis.Redis(connection_pool=self.pool)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self.active_queues
        if len(queues) != 1 or len(self.priority_steps) != 1 or not self._can_move:
            super()._brpop_start(timeout)
            return
        if self._moving is not None:
            # The last move's reply was lost with its connection (a stale socket dropped, a read that
            # failed): whatever it moved waits in flight.
            _queue, source, key = self._moving
            restored = inflight.restore(self._plain_client(), key, source)
            if restored:
                logger.warning("put back %d job(s) received on a connection that was lost", restored)
        queue = queues[0]
        self._moving = (queue, self._source(queue), inflight.list_key(self.global_keyprefix, _owner, queue))
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu declares it None
        self.client.connection.send_command("BLMOVE", self._moving[1], self._moving[2], "RIGHT", "LEFT",
                                            self.brpop_timeout if timeout is None else timeout)

    def _brpop_read(self, **options: Any) -> bool:
        if self._moving is None:
            return bool(super()._brpop_read(**options))
        queue, _source, key = self._moving
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next start reconnects and puts back what this moved
                raise
            if raw is None:
                self._moving = None
                raise virtual.Empty()
            self.receiving = (key, raw)
            try:
                self.connection._deliver(loads(bytes_to_str(raw)), queue)
            except _REDIS_UNREACHABLE:
                raise  # not recorded: still in flight, put back by the next start
            except Exception as exc:  # kombu counts KeyError as a connection error too: not here
                if self.receiving is not None:  # not recorded, and never will be
                    self._drop(key, raw, exc)
                    self._moving = None
                    raise virtual.Empty() from None
                raise
            finally:
                self.receiving = None
            self._moving = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares it bool
            self._flush_brpop_reauth()

    def _drop(self, key: str, raw: bytes, exc: Exception) -> None:
        """An item of the queue that is not a kombu message: nothing can serve it, so it must not come back."""
        logger.error("dropped an item of the queue that is not a message (%r): %r", exc, raw[:200])
        self._plain_client().lrem(key, 1, raw)  # type: ignore[arg-type]  # bytes are values


def _has_blmove(client: redis.Redis) -> bool:
    """Redis 6.2 added BLMOVE; an older server gets kombu's BRPOP, and the log says what that risks."""
    try:
        version = str(client.info("server").get("redis_version", ""))
        major, minor = (int(part) for part in version.split(".")[:2])
    except (redis.ResponseError, ValueError):
        return True  # a server that hides its version: try, and let a refusal say so
    if (major, minor) >= (6, 2):
        return True
    logger.warning("Redis %s has no BLMOVE (6.2+): jobs are received with BRPOP, and a worker killed while "
                   "receiving one can lose it; upgrade Redis", version)
    return False


class Transport(kombu_redis.Transport):
    Channel = Channel


def install(owner: str) -> None:
    """Receive with this transport in this process (``redis://`` and ``rediss://`` URLs alike), naming its
    in-flight lists after ``owner`` (the worker's node name)."""
    global _owner
    _owner = owner
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transports._transport_cache.pop(scheme, None)
