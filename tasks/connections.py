"""rerankq's own keys on the broker's Redis, reached exactly as kombu reaches the queues.

The route state, worker figures and route-change stream live beside the job queues. The client shares
kombu's connection pool, so whatever the broker URL and transport options say (password, ``rediss://``,
a socket, ``global_keyprefix``) holds for these keys too.
"""

from __future__ import annotations

from typing import Any

import redis


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

    def restore(self, tag: str) -> None:
        """Put an unacked job back at the head of its queue, atomically: the end workers take next (kombu's
        ``leftmost=True`` is the other end, behind every job waiting)."""
        self._channel.qos.restore_by_tag(tag, leftmost=False)

    def close(self) -> None:
        self._connection.release()
