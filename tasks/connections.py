"""rerankq's own keys on the broker's Redis, reached exactly as kombu reaches the queues.

The route state, worker figures and route-change stream live beside the job queues. The client shares
kombu's connection pool, so whatever the broker URL and transport options say (password, ``rediss://``,
a socket, ``global_keyprefix``) holds for these keys too.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads


def rerankq_key(prefix: str, *parts: str) -> str:
    """A rerankq key on the broker's Redis, under kombu's ``global_keyprefix``."""
    return prefix + ":".join(("rerankq", *parts))


class BrokerRedis:
    """A Redis client on the broker, with key names that honour kombu's ``global_keyprefix``."""

    def __init__(self, app: Any) -> None:
        self._connection = app.connection_for_write()
        self._channel = self._connection.default_channel
        self.client: redis.Redis = redis.Redis(connection_pool=self._channel.pool)
        self.prefix: str = self._channel.global_keyprefix

    def key(self, *parts: str) -> str:
        return rerankq_key(self.prefix, *parts)

    def queue_lists(self, queue: str) -> list[str]:
        """Every Redis list kombu keeps ``queue``'s waiting messages in (one per priority step)."""
        names = {self._channel._q_for_pri(queue, step) for step in self._channel.priority_steps}
        return sorted(self.prefix + name for name in names)

    def unacked_keys(self) -> tuple[str, str]:
        """kombu's index (delivery tag -> delivery time) and hash (delivery tag -> message) of unacked jobs."""
        qos = self._channel.qos
        return self.prefix + qos.unacked_index_key, self.prefix + qos.unacked_key

    def restore(self, tag: str, delivered_before: float) -> bool:
        """Put an unacked job back at the head of its queue (the end workers take next; kombu's
        ``leftmost=True`` is the other end, behind every job waiting), atomically, and only if it is still
        unacked from a delivery before ``delivered_before``: a job another watchdog already put back, and a
        worker took again, stays where it is. kombu's ``restore_by_tag`` with that check added (its
        ``_remove_from_indices`` and ``_do_restore_message``). Returns whether it was put back."""
        qos, restored = self._channel.qos, False

        def transaction(pipe: Any) -> None:
            nonlocal restored
            delivered, raw = pipe.zscore(qos.unacked_index_key, tag), pipe.hget(qos.unacked_key, tag)
            pipe.multi()
            if delivered is None or delivered >= delivered_before or raw is None:
                return
            message, exchange, routing_key = loads(bytes_to_str(raw))
            qos._remove_from_indices(tag, pipe)
            self._channel._do_restore_message(message, exchange, routing_key, pipe, False)
            restored = True

        with self._channel.conn_or_acquire() as client:
            client.transaction(transaction, qos.unacked_index_key, qos.unacked_key)
        return restored

    def close(self) -> None:
        self._connection.release()
