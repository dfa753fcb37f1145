"""rerankq's own keys on the broker's Redis, reached exactly as kombu reaches the queues.

The route state, worker figures and route-change stream live beside the job queues. The client shares
kombu's connection pool, so whatever the broker URL and transport options say (password, ``rediss://``,
a socket, ``global_keyprefix``) holds for these keys too.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import redis
from kombu.exceptions import OperationalError
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.errors import ConfigError


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


def refuse_bad_tls(app: Any) -> None:
    """Raise ``ConfigError`` at once when a ``rediss://`` server's certificate does not verify.

    Every rerankq process retries a Redis it cannot reach (it may be starting, or failing over); a certificate
    that does not verify never will, so the process says so and exits instead of retrying for good. Any other
    connection error is left to those retries.
    """
    if str(app.conf.broker_url).startswith("rediss://"):
        with _failing_tls("RERANKQ_BROKER_URL", app.connection_for_write().as_uri()):
            BrokerRedis(app).close()  # opening kombu's channel connects
    if str(app.conf.result_backend).startswith("rediss://"):
        with _failing_tls("RERANKQ_RESULT_BACKEND", "the result backend"):
            app.backend.client.ping()


@contextlib.contextmanager
def _failing_tls(variable: str, where: str) -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, OperationalError) as exc:
        cause = _ssl_error(exc)
        if cause is not None:
            raise ConfigError(f"TLS with Redis at {where} failed: {cause}. If a private CA signed the server's "
                              f"certificate, name it in {variable} (`?ssl_ca_certs=/path/ca.pem`); check the "
                              f"host name the certificate was issued for") from None


def _ssl_error(exc: BaseException) -> BaseException | None:
    """The TLS failure behind a redis-py connection error (it keeps the cause as the exception's context)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
