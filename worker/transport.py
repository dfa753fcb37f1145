"""kombu's Redis transport, receiving with ``BLMOVE`` so that a killed worker never loses a job in transit.

kombu pops a job with ``BRPOP`` and only then records it in its unacked hash: a worker killed between
the two, with the reply in its socket, loses that job (the soak in RELIABILITY.md lost one in about
6,000 over eight kills). Here the job moves atomically into this worker's in-flight list
(worker/inflight.py), and its unacked record and its removal from that list are one ``MULTI``. Everything
else is kombu's: acks, the visibility timeout, restoring unacked jobs.

It is also faster: one receive takes every job waiting, up to what prefetch allows (one script moves
them), and records them all in one ``MULTI``; a chunk's acks are one round trip (``ack_in_redis``) where
kombu makes one per job.

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


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.recorded:  # the receive recorded it in Redis already (Channel._record)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if getattr(self._delivered.get(delivery_tag), "acked_in_redis", False):  # by ack_in_redis
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)


def ack_in_redis(client: redis.Redis, keys: tuple[str, str], messages: list[Any]) -> None:
    """The Redis side of kombu's ack for many messages in one round trip (``keys``: kombu's unacked index and
    hash, prefixed). Each message's own ``ack()`` then only does kombu's bookkeeping. The keys are the same
    for every channel, so messages received before a reconnect are acked here too."""
    tags = [message.delivery_tag for message in messages]
    if not tags:
        return
    with client.pipeline(transaction=False) as pipe:
        pipe.zrem(keys[0], *tags)
        pipe.hdel(keys[1], *tags)
        pipe.execute()
    for message in messages:
        message.acked_in_redis = True


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: (queue, source list, in-flight list) of the BLMOVE outstanding, if any.
    _moving: tuple[str, str, str] | None = None
    #: True while delivering a job that the receive has recorded as unacked already.
    recorded = False
    _can_move = True
    _plain: redis.Redis | None = None

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
        if self._plain is None or self._plain.connection_pool is not self.pool:
            self._plain = redis.Redis(connection_pool=self.pool)
        return self._plain

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
        queue, source, key = self._moving
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next start reconnects and puts back what this moved
                raise
            if raw is None:
                self._moving = None
                raise virtual.Empty()
            # Whatever else waits, up to what prefetch allows, comes in the same receive: at hundreds of
            # jobs/s, two round trips per job were most of the event loop's time (BENCHMARKS.md).
            allowed = self.qos.can_consume_max_estimate()
            raws = [raw, *self._move_more(source, key, (BURST if allowed is None else min(BURST, allowed)) - 1)]
            received = self._record(key, raws)
            self._moving = None  # recorded or dropped: nothing of this receive is left in flight
            self._deliver_all(queue, received)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares it bool
            self._flush_brpop_reauth()

    def _move_more(self, source: str, key: str, n: int) -> list[bytes]:
        if n <= 0:
            return []
        return list(self._plain_client().eval(_MOVE_MORE, 2, source, key, n))  # type: ignore[arg-type]

    def _record(self, key: str, raws: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
        """kombu's unacked record of each moved job, and its removal from the in-flight list, in one
        transaction; an item that is not a kombu message is dropped instead. Returns (tag, payload) of
        the recorded ones."""
        received: list[tuple[str, dict[str, Any]]] = []
        now = time.time()
        index_key = self.global_keyprefix + self.qos.unacked_index_key
        hash_key = self.global_keyprefix + self.qos.unacked_key
        with self._plain_client().pipeline() as pipe:
            for raw in raws:
                try:
                    payload = loads(bytes_to_str(raw))
                    tag, delivery = payload["properties"]["delivery_tag"], payload["properties"]["delivery_info"]
                    # kombu's record: [message, exchange, routing key], the message as it came.
                    record = b"[%s,%s,%s]" % (raw, dumps(delivery["exchange"]).encode(),
                                              dumps(delivery["routing_key"]).encode())
                except Exception as exc:
                    _dropped(exc, raw)
                    pipe.lrem(key, 1, raw)  # type: ignore[arg-type]  # bytes are values
                    continue
                pipe.zadd(index_key, {tag: now})
                pipe.hset(hash_key, tag, record)
                pipe.lrem(key, 1, raw)  # type: ignore[arg-type]
                received.append((tag, payload))
            pipe.execute()
        return received

    def _deliver_all(self, queue: str, received: list[tuple[str, dict[str, Any]]]) -> None:
        errors = []
        for tag, payload in received:
            self.recorded = True
            try:
                self.connection._deliver(payload, queue)
            except Exception as exc:
                if tag in self.qos._delivered:
                    errors.append(exc)  # raised by the consumer: kombu's to handle, as with its own receive
                else:  # kombu could not make a message of it: nothing can serve it, so it must not come back
                    _dropped(exc, payload)
                    self.qos._remove_from_indices(tag).execute()
            finally:
                self.recorded = False
        if errors:
            raise errors[0]


#: Jobs in one receive at most, within what prefetch allows.
BURST = 64


def _dropped(exc: Exception, item: object) -> None:
    logger.error("dropped an item of the queue that is not a message (%r): %r", exc, str(item)[:200])


#: Move up to ARGV[1] more jobs from the queue to the in-flight list, stopping when the queue is empty.
_MOVE_MORE = """
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not item then break end
  moved[#moved + 1] = item
end
return moved
"""


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
