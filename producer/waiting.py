"""Waiting for many results at once, on one Redis connection, sync or asyncio.

Workers write each result with ``SETEX`` and ``PUBLISH`` on the job's result key (as Celery's Redis backend
does). A waiter subscribes to a job's channel *before* the job is sent, so no result can slip past; a
periodic ``MGET`` sweep of the keys still pending picks up any result whose message was missed (a
reconnect, a restarted Redis).

A pub/sub connection that goes silent without an error (its Redis host gone, or a failover that moved the
address: the socket stays open and nothing comes) would leave every result to the sweep, seconds late, for
good. So a waiter whose sweeps find results ``DEAF_SWEEPS`` times in a row with no message heard between
them takes the connection for deaf and subscribes again on a new one (``Deafness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel

from rerankq.tasks.records import Result

#: Seconds between sweeps of the pending result keys.
SWEEP_S = 2.0
#: How long a blocking waiter rides out an unreachable Redis (a restart, a failover) before giving up.
OUTAGE_S = 60.0
#: Sweeps in a row that find results while pub/sub delivers nothing before a waiter reopens its pub/sub
#: connection. One such sweep happens on a healthy connection too: a result is written before it is published.
DEAF_SWEEPS = 2

logger = logging.getLogger(__name__)

Outcome = Result | BaseException


def decode(backend: Any, raw: bytes | str) -> Outcome:
    """A stored result: the ``Result``, or the exception the job failed with (``BadJob``, ...)."""
    meta = backend.decode_result(raw)
    if meta["status"] == "SUCCESS":
        return Result.from_dict(meta["result"])
    error = meta["result"]
    return error if isinstance(error, BaseException) else RuntimeError(f"job ended {meta['status']}: {error!r}")


def result_key(backend: Any, task_id: str) -> str:
    key = backend.get_key_for_task(task_id)
    return key.decode() if isinstance(key, bytes) else str(key)


class Deafness:
    """Whether a pub/sub connection has gone deaf, from what the sweeps find (pure: the waiters call it)."""

    def __init__(self) -> None:
        self._heard = False
        self._strikes = 0

    def heard(self) -> None:
        """A message came on the pub/sub connection."""
        self._heard = True

    def swept(self, found: int) -> bool:
        """A sweep found ``found`` results still pending; True: reopen the pub/sub connection."""
        self._strikes = self._strikes + 1 if found and not self._heard else 0
        self._heard = False
        if self._strikes < DEAF_SWEEPS:
            return False
        self._strikes = 0
        return True


class Waiter:
    """Results of jobs in flight, as they arrive (blocking; one pub/sub connection for all of them)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
        self._pending: dict[str, str] = {}  # result key -> task id
        self._swept = time.monotonic()
        self._outage_since: float | None = None
        self._unsubscribed: set[str] = set()
        self._taken: list[tuple[str, Outcome]] = []
        self._deafness = Deafness()
        #: Results that came by pub/sub message and by sweep.
        self.by_message = self.by_sweep = 0

    def expect(self, task_id: str) -> None:
        """Subscribe to the job's result; call before sending it. With Redis unreachable, the subscription
        is made once it is back (and sweeps find the result meanwhile)."""
        key = result_key(self.backend, task_id)
        self._pending[key] = task_id
        try:
            self._pubsub.subscribe(key)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._unsubscribed.add(key)
            self._outage(exc)

    def __len__(self) -> int:
        """Jobs expected and not yet handed over by ``arrived``."""
        return len(self._pending) + len(self._taken)

    def arrived(self, timeout: float) -> list[tuple[str, Outcome]]:
        """``(task id, outcome)`` of the results that arrived: waits up to ``timeout`` for the first, then
        takes whatever else is already there.

        While Redis is unreachable this returns nothing (and logs once); once it is back, the pub/sub
        connection re-subscribes and a sweep picks up what was stored meanwhile. After ``OUTAGE_S`` of
        outage the connection error is raised.
        """
        try:
            if self._outage_since is not None:
                return self._recover()
            return self._arrived(timeout)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._outage(exc)
            time.sleep(min(1.0, timeout))
            return self._hand_over()

    def _outage(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            logger.warning("Redis unreachable (%r): waiting up to %.0fs for it to come back", exc, OUTAGE_S)
        if now - self._outage_since > OUTAGE_S:
            raise exc

    def _recover(self) -> list[tuple[str, Outcome]]:
        """Subscribe what could not be, and sweep for results stored while the connection was down."""
        assert self._outage_since is not None
        missing = [key for key in self._unsubscribed if key in self._pending]
        if missing:
            self._pubsub.subscribe(*missing)
        self._unsubscribed.clear()
        self._sweep()
        logger.warning("Redis is back after %.1fs", time.monotonic() - self._outage_since)
        self._outage_since = None
        return self._hand_over()

    def _arrived(self, timeout: float) -> list[tuple[str, Outcome]]:
        deadline = time.monotonic() + timeout
        while self._pending:
            # None also stands for a subscription notice it skipped: keep waiting until the deadline.
            wait = 0.0 if self._taken else max(0.0, deadline - time.monotonic())
            message = self._pubsub.get_message(timeout=wait)
            if message is None:
                if self._taken or time.monotonic() >= deadline:
                    break
                continue
            if message["type"] == "message":
                self._deafness.heard()
                self.by_message += self._take(_text(message["channel"]), message["data"])
        if time.monotonic() - self._swept >= SWEEP_S:
            self._sweep()
        return self._hand_over()

    def _sweep(self) -> None:
        self._swept = time.monotonic()
        keys = list(self._pending)
        found = sum(self._take(key, raw) for key, raw in zip(keys, self.backend.client.mget(keys) if keys else [],
                                                             strict=True) if raw is not None)
        self.by_sweep += found
        if self._deafness.swept(found):
            self._reopen(found)

    def _reopen(self, found: int) -> None:
        """Subscribe every pending job on a new connection, then drop the deaf one; where the new one cannot
        subscribe, the deaf one stays (the sweeps find the results) and the next strikes try again."""
        _reopening(found)
        fresh = self.backend.client.pubsub(ignore_subscribe_messages=True)
        try:
            if self._pending:
                fresh.subscribe(*self._pending)
        except (redis.ConnectionError, redis.TimeoutError):
            fresh.close()
            return
        deaf, self._pubsub = self._pubsub, fresh
        deaf.close()

    def _take(self, key: str, raw: bytes | str) -> bool:
        """Move a result from pending to taken, where it waits for ``arrived`` to hand it over: a
        connection error later in the same call cannot lose it. False for one taken already."""
        task_id = self._pending.pop(key, None)
        if task_id is None:  # a result already taken (message and sweep both saw it)
            return False
        self._taken.append((task_id, decode(self.backend, raw)))
        self._pubsub.unsubscribe(key)
        return True

    def _hand_over(self) -> list[tuple[str, Outcome]]:
        taken, self._taken = self._taken, []
        return taken

    def close(self) -> None:
        self._pubsub.close()


class AsyncWaiter:
    """``await``-able results on one asyncio Redis connection per event loop: no thread per request."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._client = async_client(backend)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._futures: dict[str, asyncio.Future[Outcome]] = {}
        self._reader: asyncio.Task[None] | None = None
        # Subscriptions share the one pub/sub connection: the first must open it before others use it.
        self._subscribing = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._deafness = Deafness()
        #: Results that came by pub/sub message and by sweep.
        self.by_message = self.by_sweep = 0

    async def expect(self, task_id: str) -> asyncio.Future[Outcome]:
        """Subscribe to the job's result and return the future it resolves; call before sending the job.
        With Redis unreachable this raises its connection error: the job was not sent."""
        key = result_key(self.backend, task_id)
        future = self._futures[key] = asyncio.get_running_loop().create_future()
        try:
            async with self._subscribing:
                await self._pubsub.subscribe(key)
        except BaseException:
            self._futures.pop(key, None)
            raise
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        return future

    def forget(self, task_id: str) -> None:
        """Stop awaiting the job. Its unsubscribe runs on in the background: a hung Redis never holds the
        caller up."""
        key = result_key(self.backend, task_id)
        if self._futures.pop(key, None) is not None:
            task = asyncio.create_task(self._unsubscribe(key))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _read(self) -> None:
        """Resolve futures from pub/sub messages and periodic sweeps. Rides out an unreachable Redis: the
        pub/sub connection re-subscribes when it reconnects, and a sweep then finds what was stored."""
        swept = time.monotonic()
        outage_since: float | None = None
        while self._futures:
            try:
                message = await self._pubsub.get_message(timeout=SWEEP_S)
                if message is not None and message["type"] == "message":
                    self._deafness.heard()
                    self.by_message += await self._done(_text(message["channel"]), message["data"])
                if outage_since is not None or time.monotonic() - swept >= SWEEP_S:
                    swept = time.monotonic()
                    keys = list(self._futures)
                    found = 0
                    for key, raw in zip(keys, await self._client.mget(keys), strict=True):
                        if raw is not None:
                            found += await self._done(key, raw)
                    self.by_sweep += found
                    if self._deafness.swept(found):
                        await self._reopen(found)
                if outage_since is not None:
                    logger.warning("Redis is back after %.1fs", time.monotonic() - outage_since)
                    outage_since = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if outage_since is None:
                    outage_since = time.monotonic()
                    logger.warning("Redis unreachable (%r): %d awaited results wait for it", exc, len(self._futures))
                await asyncio.sleep(0.5)

    async def _done(self, key: str, raw: bytes | str) -> bool:
        future = self._futures.pop(key, None)
        if future is None:
            return False
        if not future.done():
            future.set_result(decode(self.backend, raw))
        await self._unsubscribe(key)
        return True

    async def _reopen(self, found: int) -> None:
        """As ``Waiter._reopen``. The new connection is subscribed before anything else can use it: a
        ``forget`` meanwhile would open one of its own on it, and a pub/sub left unconnected by a failed
        subscribe would end the reader (redis-py raises ``RuntimeError`` on reading it)."""
        _reopening(found)
        async with self._subscribing:
            fresh = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                if self._futures:
                    await fresh.subscribe(*self._futures)
            except (redis.ConnectionError, redis.TimeoutError):
                with contextlib.suppress(redis.RedisError, OSError):
                    await fresh.aclose()
                return
            deaf, self._pubsub = self._pubsub, fresh
        with contextlib.suppress(redis.RedisError, OSError):
            await deaf.aclose()

    async def _unsubscribe(self, key: str) -> None:
        # Failing, it is re-subscribed on reconnect, and a message for a key no longer awaited is ignored.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            await self._pubsub.unsubscribe(key)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._pubsub.aclose()
        await self._client.aclose()


def async_client(backend: Any) -> redis.asyncio.Redis:
    """An asyncio client on Celery's result backend: the same server, or the master its sentinels name."""
    params = async_params(backend.connparams)
    hosts = params.pop("hosts", None)
    if hosts is None:
        return redis.asyncio.Redis(**params)
    options = backend.app.conf.result_backend_transport_options or {}
    sentinel = redis.asyncio.sentinel.Sentinel([(host["host"], host["port"]) for host in hosts],
                                               sentinel_kwargs=options.get("sentinel_kwargs"), **params)
    client: redis.asyncio.Redis = sentinel.master_for(options["master_name"])
    return client


def async_params(connparams: dict[str, Any]) -> dict[str, Any]:
    """Celery's Redis backend connection parameters, for ``redis.asyncio`` (same URL, password, TLS, socket)."""
    dropped = ("driver_info", "lib_name", "lib_version", "retry_on_timeout", "max_connections")
    params = {k: v for k, v in connparams.items() if k not in dropped}
    connection_class = params.pop("connection_class", None)
    if connection_class is not None and issubclass(connection_class, redis.UnixDomainSocketConnection):
        params["unix_socket_path"] = params.pop("path")
    elif connection_class is not None and issubclass(connection_class, redis.SSLConnection):
        params["ssl"] = True
    return params


def _reopening(found: int) -> None:
    logger.warning("%d results came only by sweep: the result subscription is taken for deaf and opened again "
                   "on a new connection", found)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
