"""Acks and put-backs of the jobs kombu's Redis channel delivered (worker/upstream/transport.py receives them).

Every delivery of a job carries one delivery tag, so a job put back (a reclaim) and received again has a new
record under the same tag: an ack or a put-back here touches only its own delivery's record, named by the
record's exact time (``Delivery``, ``ack_in_redis``). A lost connection (a network blip) closes the channel
while the chunk consumer goes on scoring its jobs: those are not put back as kombu would
(``QoS.restore_unacked``, ``Keeper``). A batch of settled jobs' acks are one round trip (``ack_in_redis``)
where kombu makes one per job.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from rerankq.tasks import memory, scripts
from rerankq.tasks.connections import delivery_window, restore_unacked, unacked_keys

logger = logging.getLogger(__name__)
_ACK = scripts.lua("ack")


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.recorded:  # the receive recorded it in Redis already (Channel._record)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        if getattr(message, "acked_in_redis", False):  # by ack_in_redis
            virtual.QoS.ack(self, delivery_tag)
        elif getattr(message, "delivered_at", None) is not None and not self.channel.closed:
            ack_in_redis(self.channel._plain_client(), unacked_keys(self.channel), [message])
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def can_consume(self) -> bool:
        room = self.can_consume_max_estimate()
        return room is None or room > 0

    def can_consume_max_estimate(self) -> int | None:
        """kombu's, less the jobs the consumer still serves from a channel closed by a reconnect: the new
        channel does not count them, and would take a whole prefetch more."""
        room = super().can_consume_max_estimate()
        return None if room is None else max(0, room - carried()[0])

    def restore_unacked(self, client: Any = None) -> Any:
        """As the channel closes (a shutdown, or a lost connection), put its unacked jobs back, except those
        a consumer still serves: after a lost connection (a network blip, ``CLIENT KILL``) Celery closes the
        channel while the chunk consumer goes on scoring its jobs, and kombu put every one of them back to be
        scored again elsewhere. Their records stay in Redis (reclaimed if this worker dies) and the consumer
        acks them on a connection of its own. The others go back to the head of their queue, each only if
        its record is still this delivery's (kombu's puts back by tag, whatever delivery the record is of)."""
        for tag in list(self._dirty):  # acked already
            self._delivered.pop(tag, None)
        kept = _keeper.keep(list(self._delivered)) if _keeper else set()
        for tag in kept:
            del self._delivered[tag]
        if kept:
            logger.warning("the connection closed while %d job(s) were being served: they stay unacked in Redis "
                           "until served, not put back to be served twice", len(kept))
        if client is None and getattr(self.channel.connection, "client", None) is None:
            return super().restore_unacked(client)  # no connection left to put anything back on (patches.py)
        own = [(tag, m.delivered_at) for tag, m in list(self._delivered.items())
               if getattr(m, "delivered_at", None) is not None]
        for tag, _ in own:
            del self._delivered[tag]
        for done, (tag, delivered_at) in enumerate(own):
            try:
                restore_unacked(self.channel, self.channel._plain_client(), tag, *delivery_window(delivered_at))
            except redis.RedisError as exc:  # the first error ends it: a Redis gone would cost a timeout per job
                logger.warning("could not put %d job(s) back as the channel closed (%r); their records stay, "
                               "to be reclaimed", len(own) - done, exc)
                break
        if own and self.channel.closed:
            self.channel._disconnect_pools()  # the pool the put-backs opened, after close dropped its own
        return super().restore_unacked(client)  # what kombu's own receive recorded (several queues)


class Keeper(Protocol):
    """A consumer that serves its jobs whatever becomes of the channel they came on (worker/consumer.py)."""

    def keep(self, tags: list[str]) -> set[str]:
        """Of these delivery tags of a channel closing, those whose jobs it goes on serving."""

    def carried(self) -> tuple[int, int]:
        """How many jobs it serves from closed channels: in all, and bulk ones."""


_keeper: Keeper | None = None


def serve_across_reconnects(keeper: Keeper) -> None:
    """Jobs ``keeper`` keeps are not put back as their channel closes (``QoS.restore_unacked``) and count
    against the prefetch of the channel after it."""
    global _keeper
    _keeper = keeper


def carried() -> tuple[int, int]:
    """How many jobs the consumer serves from channels closed by a reconnect: in all, and bulk ones."""
    return _keeper.carried() if _keeper else (0, 0)


class Delivery(virtual.Message):  # type: ignore[misc]
    """kombu's message, knowing which delivery of its job it is."""

    #: When it was recorded unacked (its score in kombu's unacked index): which delivery this is.
    delivered_at: float | None = None
    #: Set by worker/settle.py ``requeue``: rejected, it goes back to the head of its queue through ``put_back``.
    to_head = False

    def ack(self, multiple: bool = False) -> None:
        if self._superseded():
            self._state = "ACK"  # as kombu's ack leaves it
            return
        super().ack(multiple)

    def reject(self, requeue: bool = False) -> None:
        if self._superseded():
            self._state = "REJECTED"  # as kombu's reject leaves it
        elif requeue and self.to_head and self.delivered_at is not None and not self.acknowledged:
            self.channel.put_back(self)
            self._state = "REJECTED"
        else:
            super().reject(requeue)

    def _superseded(self) -> bool:
        """Its job was put back (reclaimed) and received again on this channel since: the delivery tag, and
        kombu's bookkeeping under it, are the new delivery's, which this one's ack or reject must not touch."""
        if self.acknowledged or self.channel is None or self.channel.closed:
            return False
        return self.channel.qos._delivered.get(self.delivery_tag, self) is not self


def ack_in_redis(client: redis.Redis, keys: tuple[str, str], messages: list[Any]) -> None:
    """The Redis side of kombu's ack for many messages in one round trip (``keys``: kombu's unacked index and
    hash, prefixed). Each message's own ``ack()`` then only does kombu's bookkeeping. The keys are the same
    for every channel, so messages received before a reconnect are acked here too.

    Each message removes its own delivery's record only: a job put back (by a reconnect, or a reclaim from a
    worker taken for dead) and received again carries the same delivery tag, and kombu's ack by tag deleted
    the new delivery's record, so that if its holder died the job was in no list and no hash."""
    if not messages:
        return
    args: list[str] = []
    for message in messages:
        at = getattr(message, "delivered_at", None)
        args += [message.delivery_tag, *(map(repr, delivery_window(at)) if at is not None else ("", ""))]
    client.eval(memory.script(client, _ACK), 2, *keys, *args)  # type: ignore[arg-type]
    for message in messages:
        message.acked_in_redis = True

