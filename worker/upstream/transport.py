"""kombu's Redis transport, receiving with ``BLMOVE`` so that a killed worker never loses a job in transit.

kombu pops a job with ``BRPOP`` and only then records it in its unacked hash: a worker killed between
the two, with the reply in its socket, loses that job (the soak in RELIABILITY.md lost one in about
6,000 over eight kills). Here the job moves atomically into this worker's in-flight list
(worker/inflight.py), and its unacked record and its removal from that list are one script. The visibility
timeout is kombu's.

Its acks and put-backs, each touching only its own delivery's record, are worker/upstream/acks.py's.

It is also faster: one receive takes every job waiting, up to what prefetch allows (one script moves
them), and records them all in one script.

A worker serves the two lanes of its queue (tasks/lanes.py), each with its own in-flight list. A receive
first looks at every lane without blocking (one script: interactive lanes first, then bulk ones up to the
bulk limit, so a worker full of bulk jobs keeps room for interactive ones); when that finds nothing, the
next receive blocks with ``BLMOVE`` on the interactive lane for at most ``LANE_POLL_S`` before looking
again. ``priority_steps`` is ``[0]``: one list per lane. A worker on Redis older than 6.2, which has no
``BLMOVE``, receives as kombu does and says what that risks.

A full Redis (tasks/memory.py) refuses ``BLMOVE`` and ``MULTI``: the moves and the record run as scripts
it still runs (Redis 7+), and where a blocking receive would be refused the worker pauses with a ``BLPOP``
on a key nothing writes (never refused), then looks again. Nothing is refused half-done: a refused step has
moved nothing, or leaves its jobs in flight to be put back.
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

from rerankq import celeryconfig
from rerankq.tasks import clock, lanes, memory, primary, scripts, sentinel
from rerankq.tasks.connections import delivery_window, rerankq_key, restore_unacked, unacked_keys
from rerankq.worker import inflight, metrics
from rerankq.worker.dropped import NOT_A_MESSAGE, dropped
from rerankq.worker.upstream import acks
from rerankq.worker.upstream.acks import Delivery, QoS

logger = logging.getLogger(__name__)
_RECORD, _MOVE_LANES = scripts.lua("record"), scripts.lua("move_lanes")

#: The transport options a worker passes its channels (``options()``): the Celery node name that names its
#: in-flight lists, and the bulk jobs it holds at most (``Settings.bulk_limit``; None: no limit).
OPTIONS = ("rerankq_owner", "rerankq_bulk_limit")


class Source(NamedTuple):
    """One list a worker receives from: its queue, the queue's Redis list, this worker's in-flight list."""

    queue: str
    source: str
    key: str


class Channel(primary.Channel):
    QoS = QoS
    Message = Delivery
    from_transport_options = kombu_redis.Channel.from_transport_options + OPTIONS  # type: ignore[assignment]

    #: Names this worker's in-flight lists (its Celery node name, from ``options()``).
    rerankq_owner = f"{socket.gethostname()}-{os.getpid()}"
    #: Bulk jobs this worker holds at most; None: no limit.
    rerankq_bulk_limit: int | None = None

    #: The receive outstanding, if any: its command, and the lists it may have moved jobs from.
    _moving: tuple[str, list[Source]] | None = None
    #: The last look at every lane found nothing: the next receive blocks on the first lane.
    _idle = False
    #: True while delivering a job that the receive has recorded as unacked already.
    recorded = False
    _can_move = True
    _plain: redis.Redis | None = None
    #: Lists a lost or refused receive may have left jobs in: put back before the next receive.
    _stranded: tuple[Source, ...] = ()
    #: Redis refused the last write for want of memory: pause once instead of a blocking receive.
    _full = False
    #: Said so in the log (and the metric) since the last blocking receive Redis took.
    _reported = False
    _move_script = ""

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        # Before the first receive: take back what a worker of the same name left in flight.
        clock.sync(self._plain_client, force=True)  # before the first time this worker writes
        source, key = self._source(queue), inflight.list_key(self.global_keyprefix, self.rerankq_owner, queue)
        try:
            restored = inflight.adopt(self._plain_client(), self.global_keyprefix, key, source)
        except redis.ResponseError as exc:  # Redis 6.2, full: scripts cannot say they only move jobs
            if not memory.is_full(exc):
                raise
            self._stranded += (Source(queue, source, key),)  # put back once it has room
            restored = 0
        if restored:
            logger.warning("put back %d job(s) a previous worker named %s left in flight", restored,
                           self.rerankq_owner)
        self._can_move = _has_blmove(self._plain_client())
        self._move_script = memory.script(self._plain_client(), _MOVE_LANES)
        return super().basic_consume(queue, *args, **kwargs)

    def _size(self, queue: str) -> int:
        """kombu's, without its MULTI: a full Redis refuses every command queued in one, reads too, and
        kombu asks for the size as the consumer declares its queues."""
        with self.conn_or_acquire() as client:
            return sum(int(client.llen(self._q_for_pri(queue, step))) for step in self.priority_steps)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except redis.ResponseError as exc:  # bound already by whoever sent the jobs queued, in all likelihood
            if not memory.is_full(exc):
                raise
            logger.warning("Redis is full: could not record %s's binding; a queue bound before (by whoever sent "
                           "its jobs) is served all the same", queue)

    def put_back(self, message: Delivery) -> None:
        """On the event loop (Celery's reject runs there): put a delivery back at the head of its queue and
        forget it, in one step no receive can come between. Only this delivery: if its job was reclaimed
        and received again meanwhile (same delivery tag, a new record), that delivery is left alone."""
        tag = message.delivery_tag
        if self.qos._delivered.get(tag) is not message:
            return  # received again since: this delivery's record is gone, the new one is not ours to touch
        if not self.closed:  # closed: its record stays for the reclaim
            restore_unacked(self, self._plain_client(), tag, *delivery_window(float(message.delivered_at or 0.0)))
        virtual.QoS.ack(self.qos, tag)  # kombu's bookkeeping alone: the Redis side is done

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
        return [Source(queue, self._source(queue), inflight.list_key(self.global_keyprefix, self.rerankq_owner, queue))
                for queue in queues]

    def _allowance(self, sources: list[Source]) -> tuple[int, list[int]]:
        """How many jobs this receive may take in all, and from each source: bulk lanes only up to the bulk
        limit, so that a worker full of bulk jobs still has room to receive interactive ones."""
        room = self.qos.can_consume_max_estimate()
        total = BURST if room is None else max(0, min(BURST, room))
        if self.rerankq_bulk_limit is None:
            return total, [total] * len(sources)
        delivered, dirty = self.qos._delivered, self.qos._dirty
        bulk_held = sum(1 for tag, message in list(delivered.items())
                        if tag not in dirty and lanes.lane_of(_routing_key(message)) == lanes.BULK)
        bulk_held += acks.carried()[1]
        bulk_room = max(0, self.rerankq_bulk_limit - bulk_held)
        return total, [bulk_room if lanes.lane_of(s.queue) == lanes.BULK else total for s in sources]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if len(self.priority_steps) != 1 or not self._can_move or not self.active_queues:
            super()._brpop_start(timeout)
            return
        if self._moving is not None:
            # The last receive's reply was lost with its connection (a stale socket dropped, a read that
            # failed): whatever it moved waits in flight.
            self._stranded, self._moving = _merged(self._stranded, self._moving[1]), None
        sources = self._sources()
        connection = self.client.connection
        if self._stranded:
            try:
                for lost in self._stranded:
                    restored = inflight.restore(self._plain_client(), lost.key, lost.source)
                    if restored:
                        logger.warning("put back %d job(s) a lost or refused receive left in flight", restored)
                self._stranded = ()
            except redis.ResponseError as exc:
                if not memory.is_full(exc):
                    raise
                self._refused(exc)
        if self._idle:
            # Nothing anywhere: block on the first lane, and look at the others again soon.
            wait = self.brpop_timeout if timeout is None else timeout
            if len(sources) > 1:
                wait = min(wait, LANE_POLL_S)
            if self._full:
                self._moving = ("BLPOP", [])
                connection.send_command("BLPOP", rerankq_key(self.global_keyprefix, "full-pause", self.rerankq_owner),
                                        FULL_PAUSE_S)
            else:
                self._moving = ("BLMOVE", sources)
                connection.send_command("BLMOVE", sources[0].source, sources[0].key, "RIGHT", "LEFT", wait)
        else:
            total, caps = self._allowance(sources)
            self._moving = ("EVAL", sources)
            connection.send_command("EVAL", self._move_script, 2 * len(sources),
                                    *(key for s in sources for key in (s.source, s.key)), total, *caps, 0)
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu declares it None

    def _refused(self, exc: redis.ResponseError) -> None:
        """Redis is full: say so once, and pause before the next look (then try a blocking receive again)."""
        if not self._reported:
            logger.warning("Redis is full (%s): new jobs and results are refused; this worker serves what is "
                           "queued and pauses between looks until memory comes back", exc)
            metrics.REDIS_FULL.set(1)
            self._reported = True
        self._full, self._idle = True, True

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
            except redis.ResponseError as exc:
                if not memory.is_full(exc):
                    raise
                self._moving = None  # refused before it moved anything (a script stops at its first write)
                self._refused(exc)
                raise virtual.Empty() from None
            if command == "BLPOP":  # the pause is over: look again, then try a blocking receive
                self._moving, self._idle, self._full = None, False, False
                raise virtual.Empty()
            if command == "BLMOVE":
                if self._reported:
                    logger.warning("Redis takes writes again")
                    metrics.REDIS_FULL.set(0)
                    self._reported = False
                self._idle = False  # whatever came, look at every lane without blocking next time
                if raw is None:
                    self._moving = None
                    raise virtual.Empty()
            try:
                if command == "BLMOVE":
                    # Whatever else waits, up to what prefetch allows, comes in the same receive: at hundreds
                    # of jobs/s, two round trips per job were most of the event loop's time (BENCHMARKS.md).
                    total, caps = self._allowance(sources)
                    caps[0] -= 1
                    moved = [(sources[0], raw), *self._move_lanes(sources, total - 1, caps, held=1)]
                else:
                    moved = _pair(sources, raw)
                    if not moved:
                        self._idle = True
                        self._moving = None
                        raise virtual.Empty()
                received, recorded_at = self._record(moved)
            except redis.ResponseError as exc:  # Redis 6.2 filled up mid-receive: what moved waits in flight
                if not memory.is_full(exc):
                    raise
                self._stranded, self._moving = _merged(self._stranded, sources), None
                self._refused(exc)
                raise virtual.Empty() from None
            self._moving = None  # recorded or dropped: nothing of this receive is left in flight
            self._deliver_all(received, recorded_at)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu declares it bool
            self._flush_brpop_reauth()

    def _move_lanes(self, sources: list[Source], total: int, caps: list[int], held: int) -> list[tuple[Source, bytes]]:
        if total <= 0:
            return []
        keys = [key for s in sources for key in (s.source, s.key)]
        raw = self._plain_client().eval(self._move_script, len(keys), *keys, total, *caps, held)  # type: ignore[arg-type]
        return _pair(sources, raw)

    def _record(self, moved: list[tuple[Source, bytes]]) -> tuple[list[tuple[str, str, dict[str, Any]]], float]:
        """kombu's unacked record of each moved job, and its removal from the in-flight list, in one script
        that a full Redis still runs; an item that is not a kombu message is dropped instead. A job no longer
        in the in-flight list was put back by a worker that took this one for dead: it is not recorded, nor
        served here. Returns (queue, tag, payload) of the recorded ones, and the time they were recorded at."""
        parsed: dict[str, tuple[str, dict[str, Any]]] = {}
        args: list[Any] = []
        for source, raw in moved:
            try:
                payload = loads(bytes_to_str(raw))
                tag, delivery = payload["properties"]["delivery_tag"], payload["properties"]["delivery_info"]
                if not isinstance(tag, str) or not tag or tag in parsed:
                    raise ValueError(f"delivery tag {tag!r}: not a string, or one this receive has already")
                headers = payload.get("headers") or {}
                if not isinstance(headers, dict) or not isinstance(headers.get("task", ""), str):
                    raise ValueError("headers not an object, or a task name that is not a string")
                # kombu's record: [message, exchange, routing key], the message as it came.
                record = b"[%s,%s,%s]" % (raw, dumps(delivery["exchange"]).encode(),
                                          dumps(delivery["routing_key"]).encode())
            except Exception as exc:
                dropped(source.queue, NOT_A_MESSAGE, repr(exc), raw)
                args += [source.key, raw, "", ""]
                continue
            parsed[tag] = (source.queue, payload)
            args += [source.key, raw, tag, record]
        now = clock.now()  # the watchdog's reclaim compares it with its own clock.now()
        index_key, hash_key = unacked_keys(self)
        client = self._plain_client()
        recorded = client.eval(memory.script(client, _RECORD), 2, index_key, hash_key, repr(now), *args)  # type: ignore[arg-type]
        received = [(*parsed[tag], tag) for tag in map(bytes_to_str, recorded)]  # type: ignore[union-attr]
        if len(received) < len(parsed):
            logger.warning("%d job(s) received were put back meanwhile by a worker that took this one for dead; "
                           "not served here", len(parsed) - len(received))
        return [(queue, tag, payload) for queue, payload, tag in received], now

    def _deliver_all(self, received: list[tuple[str, str, dict[str, Any]]], recorded_at: float) -> None:
        errors = []
        for queue, tag, payload in received:
            self.recorded = True
            try:
                self.connection._deliver(payload, queue)
                delivered = self.qos._delivered.get(tag)
                if delivered is not None:
                    delivered.delivered_at = recorded_at  # which delivery it is, for put_back
            except Exception as exc:
                if tag in self.qos._delivered:
                    errors.append(exc)  # raised by the consumer: kombu's to handle, as with its own receive
                else:  # kombu could not make a message of it: nothing can serve it, so it must not come back
                    dropped(queue, NOT_A_MESSAGE, repr(exc), payload)
                    self.qos._remove_from_indices(tag).execute()
            finally:
                self.recorded = False
        if errors:
            raise errors[0]


def _merged(stranded: tuple[Source, ...], more: list[Source]) -> tuple[Source, ...]:
    return tuple(dict.fromkeys((*stranded, *more)))


def _pair(sources: list[Source], replies: Any) -> list[tuple[Source, bytes]]:
    """The script's reply (one list of moved items per source) as (source, item) pairs, in source order."""
    return [(source, item) for source, items in zip(sources, replies, strict=True) for item in items]


def _routing_key(message: Any) -> str:
    return str((getattr(message, "delivery_info", None) or {}).get("routing_key") or "")


#: Jobs in one receive at most, within what prefetch allows.
BURST = 64


#: How long a worker pauses between looks at its lanes while Redis is full (no job can arrive meanwhile: a
#: full Redis refuses new ones).
FULL_PAUSE_S = 0.5

#: How long an idle worker blocks on its interactive lane before it looks at its bulk lane again: the
#: most a bulk job sent to an idle worker waits to be received (a busy worker takes bulk jobs at once).
LANE_POLL_S = 0.05


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


# The Sentinel channel's connection classes win (its base comes first); mypy wants both bases to name one type.
class SentinelChannel(sentinel.SentinelChannel, Channel):  # type: ignore[misc]
    """rerankq's Sentinel channel (its connections reach whichever server the sentinels name master,
    tasks/sentinel.py), receiving as ``Channel`` does."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + OPTIONS  # type: ignore[assignment]


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def for_url(url: str) -> tuple[str, str]:
    """The broker URL and transport a worker connects with: the transport by its class's import path (Celery's
    ``broker_transport``; a path, not the class, so that ``celery inspect stats`` can still show it), not by
    rewriting kombu's process-wide scheme aliases. kombu takes the transport from a ``redis+socket://`` URL's
    prefix over the one it is given, so such a URL is read as ``rerankq+socket://``, the one alias this adds (no
    alias of kombu's changes)."""
    if celeryconfig.sentinel(url):
        return url, f"{__name__}:SentinelTransport"
    if url.startswith("redis+socket://"):
        kombu_transports.TRANSPORT_ALIASES.setdefault("rerankq", f"{__name__}:Transport")
        return "rerankq+" + url.removeprefix("redis+"), f"{__name__}:Transport"
    return url, f"{__name__}:Transport"


def options(owner: str, bulk_limit: int | None) -> dict[str, Any]:
    """Transport options naming this worker's in-flight lists after ``owner`` (its node name), holding at most
    ``bulk_limit`` bulk jobs."""
    return {"rerankq_owner": owner, "rerankq_bulk_limit": bulk_limit}
