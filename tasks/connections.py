"""rerankq's own keys on the broker's Redis, reached exactly as kombu reaches the queues.

The route state, worker figures and route-change stream live beside the job queues. The client shares
kombu's connection pool, so whatever the broker URL and transport options say (password, ``rediss://``,
a socket, ``global_keyprefix``) holds for these keys too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Iterator
from typing import Any

import redis
from kombu.exceptions import OperationalError
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from kombu.utils.url import maybe_sanitize_url

from rerankq.tasks import memory, scripts
from rerankq.tasks.errors import ConfigError, causes

logger = logging.getLogger(__name__)
_RESTORE = scripts.lua("restore_unacked")


def broker_shown(app: Any) -> str:
    """The broker's URL(s) as a message shows them, passwords masked. kombu's ``as_uri`` puts a transport given
    by its class's path (rerankq's, ``tasks/primary.py``) where the scheme goes."""
    return ";".join(maybe_sanitize_url(url) for url in str(app.conf.broker_url).split(";"))


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
        return unacked_keys(self._channel)

    def restore(self, tag: str, delivered_before: float) -> bool:
        """Put an unacked job back at the head of its queue (the end workers take next; kombu's
        ``leftmost=True`` is the other end, behind every job waiting), atomically, and only if it is still
        unacked from a delivery before ``delivered_before``: a job another watchdog already put back, and a
        worker took again, stays where it is. Returns whether it was put back."""
        return restore_unacked(self._channel, self.client, tag, float("-inf"), delivered_before)

    def put_back(self, tag: str, delivered_at: float) -> bool:
        """Put back the delivery of ``tag`` recorded at ``delivered_at``, and no other (``restore``)."""
        return restore_unacked(self._channel, self.client, tag, *delivery_window(delivered_at))

    def close(self) -> None:
        self._connection.release()


def unacked_keys(channel: Any) -> tuple[str, str]:
    """kombu's index (delivery tag -> delivery time) and hash (delivery tag -> message) of unacked jobs, under
    ``channel``'s key prefix (a kombu Redis channel of the broker)."""
    prefix, qos = channel.global_keyprefix, channel.qos
    return prefix + qos.unacked_index_key, prefix + qos.unacked_key


def delivery_window(delivered_at: float) -> tuple[float, float]:
    """The [from, before) window that names one delivery of a job by its record's exact time: every
    delivery of a job carries the same delivery tag, so the time is what tells them apart."""
    return delivered_at, math.nextafter(delivered_at, math.inf)


def restore_unacked(channel: Any, client: redis.Redis, tag: str, delivered_from: float,
                    delivered_before: float) -> bool:
    """kombu's ``restore_by_tag`` (to the head, not the tail), only for a delivery of ``tag`` recorded at a
    time in [``delivered_from``, ``delivered_before``), as one script that a full Redis still runs (it only
    moves the job). kombu's own deletes the record and then pushes, so a push a full Redis refused lost the
    job. ``channel``: a kombu Redis channel of the broker, ``client`` a plain client on its pool."""
    index_key, hash_key = unacked_keys(channel)
    raw = client.hget(hash_key, tag)
    if raw is None:
        return False
    message, exchange, routing_key = loads(bytes_to_str(raw))  # type: ignore[arg-type]
    pushes = _Pushes(channel.global_keyprefix)
    channel._do_restore_message(message, exchange, routing_key, pushes, False)
    if not pushes.items:  # kombu found no queue for it (and logged why): leave it unacked
        return False
    keys = [index_key, hash_key, *(key for key, _ in pushes.items)]
    bounds = [repr(max(delivered_from, -1e300)), repr(min(delivered_before, 1e300))]  # numbers Lua reads
    restored = client.eval(memory.script(client, _RESTORE), len(keys), *keys, tag, raw, *bounds,  # type: ignore[arg-type]
                           *(value for _, value in pushes.items))
    return bool(restored)


class _Pushes:
    """Stands in for the pipeline kombu's ``_do_restore_message`` pushes to, collecting (key, value)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.items: list[tuple[str, str]] = []

    def rpush(self, key: str, value: str) -> None:  # the head: restore passes leftmost=False
        self.items.append((self.prefix + key, value))



def refuse_unusable(app: Any) -> None:
    """Raise ``ConfigError`` at once for a Redis rerankq can never use: a ``rediss://`` server whose
    certificate does not verify, a Redis Cluster node, or a Sentinel named as a Redis (``redis://`` rather
    than ``sentinel://``: it answers ``PING`` and ``INFO`` but no command on keys).

    Every rerankq process retries a Redis it cannot reach (it may be starting, or failing over); these never
    will work, so the process says so and exits instead of retrying for good. Any other connection error is
    left to those retries.
    """
    broker, clustered, sentinel, replica = None, False, False, False
    try:
        # A connection error other than TLS's is left to the process's retries (``_failing_tls``).
        with _failing_tls("RERANKQ_BROKER_URL", broker_shown(app)):
            broker = BrokerRedis(app)
            # The default sections: server's redis_mode, cluster's cluster_enabled, replication's role.
            info = broker.client.info()
            sentinel = info.get("redis_mode") == "sentinel"
            clustered = str(info.get("cluster_enabled", 0)) == "1"
            replica = info.get("role") == "slave"
    except redis.ResponseError:  # a server that hides INFO
        pass
    finally:
        if broker is not None:
            broker.close()
    if sentinel:
        raise ConfigError("RERANKQ_BROKER_URL names a Redis Sentinel as if it were a Redis: give the sentinels as "
                          "sentinel://host:26379;sentinel://host2:26379 and the master's name in "
                          "RERANKQ_SENTINEL_MASTER (the same for RERANKQ_RESULT_BACKEND)")
    if replica:  # a failover under way may make it the primary, or move the address: not refused
        logger.warning("RERANKQ_BROKER_URL reaches a read-only replica: every write is refused until the address "
                       "reaches the primary (a failover in progress); if it names a reader endpoint, give the "
                       "primary's")
    if clustered:
        raise ConfigError("RERANKQ_BROKER_URL names a Redis Cluster node: rerankq is not supported on Redis Cluster "
                          "(kombu's Redis transport cannot use one); use one Redis, or Redis Sentinel for failover")
    if str(app.conf.result_backend).startswith("rediss://"):
        with _failing_tls("RERANKQ_RESULT_BACKEND", "the result backend"):
            app.backend.client.ping()


@contextlib.contextmanager
def _failing_tls(variable: str, where: str) -> Iterator[None]:
    """Turn a TLS verification failure into ``ConfigError``; swallow any other connection error."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
        cause = next((seen for seen in causes(exc) if isinstance(seen, ssl.SSLError)), None)
        if cause is not None:
            raise ConfigError(f"TLS with Redis at {where} failed: {cause}. If a private CA signed the server's "
                              f"certificate, name it in {variable} (`?ssl_ca_certs=/path/ca.pem`); check the "
                              f"host name the certificate was issued for") from None
