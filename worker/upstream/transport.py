"""kombu's Redis transport, receiving with ``BLMOVE`` so that a killed worker never loses a job in transit.

kombu pops a job with ``BRPOP`` and only then records it in its unacked hash: a worker killed between
the two, with the reply in its socket, loses that job (the soak in RELIABILITY.md lost one in about
6,000 over eight kills). Here the job moves atomically into this worker's in-flight list
(worker/inflight.py), and its unacked record and its removal from that list are one ``MULTI``. Everything
else is kombu's: acks, the visibility timeout, restoring unacked jobs.

It is also faster: one receive takes every job waiting, up to what prefetch allows (one script moves
them), and records them all in one ``MULTI``; a batch of settled jobs' acks are one round trip (``ack_in_redis``) where
kombu makes one per job.

A worker serves the two lanes of its queue (tasks/lanes.py), each with its own in-flight list. A receive
first looks at every lane without blocking (one script: interactive lanes first, then bulk ones up to the
bulk limit, so a worker full of bulk jobs keeps room for interactive ones); when that finds nothing, the
next receive blocks with ``BLMOVE`` on the interactive lane for at most ``LANE_POLL_S`` before looking
again. ``priority_steps`` is ``[0]``: one list per lane. A worker on Redis older than 6.2, which has no
``BLMOVE``, receives as kombu does and says what that risks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, NamedTuple

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tasks import lanes
from worker import inflight

logger = logging.getLogger(__name__)

#: Names this process's in-flight lists: the Celery node name once the worker knows it.
_owner = f"{socket.gethostname()}-{os.getpid()}"
#: Bulk jobs this process holds at most (``Settings.bulk_limit``), once a worker installs the transport.
_bulk_limit: int | None = None


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


class Source(NamedTuple):
    """One list a worker receives from: its queue, the queue's Redis list, this worker's in-flight list."""

    queue: str
    source: str
    key: str


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: The receive outstanding, if any: its command, and the lists it may have moved jobs from.
    _moving: tuple[str, list[Source]] | None = None
    #: The last look at every lane found nothing: the next receive blocks on the first lane.
    _idle = False
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
        self._can_move = _has_blmove(self._plain_client())
        return super().basic_consume(queue, *args, **kwargs)

    def _source(self, queue: str) -> str:
        return f"{self.global_keyprefix}{self._q_for_pri(queue, 0)}"

    def _plain_client(self) -> redis.Redis:
        """A client on kombu's pool that does not prefix keys (ours carry the prefix already)."""
        if self._plain is None or self._plain.connection_pool is not self.pool:
            self._plain = redis.Redis(connection_pool=self.pool)
        return self._plain

    def _sources(self) -> list[Source]:
        """The lists to receive from, in the order jobs are taken: interactive lanes, then bulk lanes."""
        queues = sorted(self.active_queues, key=lambda queue: (lanes.lane_of(queue) == lanes.BULK, queue))
        return [Source(queue, self._source(queue), inflight.list_key(self.global_keyprefix, _owner, queue))
                for queue in queues]

    def _allowance(self, sources: list[Source]) -> tuple[int, list[int]]:
        """How many jobs this receive may take in all, and from each source: bulk lanes only up to the bulk
        limit, so that a worker full of bulk jobs still has room to receive interactive ones."""
        room = self.qos.can_consume_max_estimate()
        total = BURST if room is None else max(0, min(BURST, room))
        if _bulk_limit is None:
            return total, [total] * len(sources)
        delivered, dirty = self.qos._delivered, self.qos._dirty
        bulk_held = sum(1 for tag, message in list(delivered.items())
                        if tag not in dirty and lanes.lane_of(_routing_key(message)) == lanes.BULK)
        bulk_room = max(0, _bulk_limit - bulk_held)
        return total, [bulk_room if lanes.lane_of(s.queue) == lanes.BULK else total for s in sources]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if len(self.priority_steps) != 1 or not self._can_move or not self.active_queues:
            super()._brpop_start(timeout)
            return
        if self._moving is not None:
            # The last receive's reply was lost with its connection (a stale socket dropped, a read that
            # failed): whatever it moved waits in flight.
            for lost in self._moving[1]:
                restored = inflight.restore(self._plain_client(), lost.key, lost.source)
                if restored:
                    logger.warning("put back %d job(s) received on a connection that was lost", restored)
        sources = self._sources()
        connection = self.client.connection
        if self._idle:
            # Nothing anywhere: block on the first lane, and look at the others again soon.
            wait = self.brpop_timeout if timeout is None else timeout
            if len(sources) > 1:
                wait = min(wait, LANE_POLL_S)
            self._moving = ("BLMOVE", sources)
            connection.send_command("BLMOVE", sources[0].source, sources[0].key, "RIGHT", "LEFT", wait)
        else:
            total, caps = self._allowance(sources)
            self._moving = ("EVAL", sources)
            connection.send_command("EVAL", _MOVE_LANES, 2 * len(sources),
                                    *(key for s in sources for key in (s.source, s.key)), total, *caps)
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu declares it None

    def _brpop_read(self, **options: Any) -> bool:
        if self._moving is None:
            return bool(super()._brpop_read(**options))
        command, sources = self._moving
        try:
            try:
                raw = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next start reconnects and puts back what this moved
                raise
            if command == "BLMOVE":
                self._idle = False  # whatever came, look at every lane without blocking next time
                if raw is None:
                    self._moving = None
                    raise virtual.Empty()
                # Whatever else waits, up to what prefetch allows, comes in the same receive: at hundreds of
                # jobs/s, two round trips per job were most of the event loop's time (BENCHMARKS.md).
                total, caps = self._allowance(sources)
                caps[0] -= 1
                moved = [(sources[0], raw), *self._move_lanes(sources, total - 1, caps)]
            else:
                moved = _pair(sources, raw)
                if not moved:
                    self._idle = True
                    self._moving = None
                    raise virtual.Empty()
            received = self._record(moved)
            self._moving = None  # recorded or dropped: nothing of this receive is left in flight
            self._deliver_all(received)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares it bool
            self._flush_brpop_reauth()

    def _move_lanes(self, sources: list[Source], total: int, caps: list[int]) -> list[tuple[Source, bytes]]:
        if total <= 0:
            return []
        keys = [key for s in sources for key in (s.source, s.key)]
        raw = self._plain_client().eval(_MOVE_LANES, len(keys), *keys, total, *caps)  # type: ignore[arg-type]
        return _pair(sources, raw)

    def _record(self, moved: list[tuple[Source, bytes]]) -> list[tuple[str, str, dict[str, Any]]]:
        """kombu's unacked record of each moved job, and its removal from the in-flight list, in one
        transaction; an item that is not a kombu message is dropped instead. Returns (queue, tag, payload)
        of the recorded ones."""
        received: list[tuple[str, str, dict[str, Any]]] = []
        now = time.time()
        index_key = self.global_keyprefix + self.qos.unacked_index_key
        hash_key = self.global_keyprefix + self.qos.unacked_key
        with self._plain_client().pipeline() as pipe:
            for source, raw in moved:
                try:
                    payload = loads(bytes_to_str(raw))
                    tag, delivery = payload["properties"]["delivery_tag"], payload["properties"]["delivery_info"]
                    # kombu's record: [message, exchange, routing key], the message as it came.
                    record = b"[%s,%s,%s]" % (raw, dumps(delivery["exchange"]).encode(),
                                              dumps(delivery["routing_key"]).encode())
                except Exception as exc:
                    _dropped(exc, raw)
                    pipe.lrem(source.key, 1, raw)  # type: ignore[arg-type]  # bytes are values
                    continue
                pipe.zadd(index_key, {tag: now})
                pipe.hset(hash_key, tag, record)
                pipe.lrem(source.key, 1, raw)  # type: ignore[arg-type]
                received.append((source.queue, tag, payload))
            pipe.execute()
        return received

    def _deliver_all(self, received: list[tuple[str, str, dict[str, Any]]]) -> None:
        errors = []
        for queue, tag, payload in received:
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


def _pair(sources: list[Source], replies: Any) -> list[tuple[Source, bytes]]:
    """The script's reply (one list of moved items per source) as (source, item) pairs, in source order."""
    return [(source, item) for source, items in zip(sources, replies, strict=True) for item in items]


def _routing_key(message: Any) -> str:
    return str((getattr(message, "delivery_info", None) or {}).get("routing_key") or "")


#: Jobs in one receive at most, within what prefetch allows.
BURST = 64


def _dropped(exc: Exception, item: object) -> None:
    logger.error("dropped an item of the queue that is not a message (%r): %r", exc, str(item)[:200])


#: How long an idle worker blocks on its interactive lane before it looks at its bulk lane again: the
#: most a bulk job sent to an idle worker waits to be received (a busy worker takes bulk jobs at once).
LANE_POLL_S = 0.05

#: Move up to ARGV[1] jobs in all from the sources KEYS[1], KEYS[3], ... (in that order) to their in-flight
#: lists KEYS[2], KEYS[4], ..., at most ARGV[1 + i] from source i. Returns one list of moved items per source.
_MOVE_LANES = """
local left = tonumber(ARGV[1])
local replies = {}
for i = 1, #KEYS / 2 do
  local moved = {}
  local cap = math.min(left, tonumber(ARGV[1 + i]))
  while #moved < cap do
    local item = redis.call('LMOVE', KEYS[2 * i - 1], KEYS[2 * i], 'RIGHT', 'LEFT')
    if not item then break end
    moved[#moved + 1] = item
  end
  left = left - #moved
  replies[i] = moved
end
return replies
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


def install(owner: str, bulk_limit: int | None) -> None:
    """Receive with this transport in this process (``redis://`` and ``rediss://`` URLs alike), naming its
    in-flight lists after ``owner`` (the worker's node name), holding at most ``bulk_limit`` bulk jobs."""
    global _owner, _bulk_limit
    _owner, _bulk_limit = owner, bulk_limit
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transports._transport_cache.pop(scheme, None)
