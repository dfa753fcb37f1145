"""Revoking jobs whose caller is gone (an ``arerank`` cancelled, an HTTP client that disconnected), from one thread.

Workers drop a revoked job before its first forward batch (worker/runner.py), or on receipt; one already in a
batch finishes. Celery's ``control.revoke`` broadcast holds a connection of the app's pool while it takes a
producer from the producer pool, which takes a second one: ten threads revoking at once held the pool's ten
connections and waited for ever for an eleventh, and every send of the process behind them. So revokes go
through this one thread, published on a connection of its own (out of both pools), the ids waiting meanwhile sent
together in one broadcast. The queue is bounded: past it ids are dropped (counted, said at most every
``WARN_EVERY_S``), and each one's deadline still stops it being scored long after. While Redis is away the
broadcast retries as kombu's mailbox does, holding only this thread and its own connection.

Only ``revoke`` is called from other threads; every other field is the revoking thread's, but for ``_unsent`` and
the thread itself, which ``_lock`` guards. A process forked from one that revoked starts afresh.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger(__name__)

#: Ids waiting to be revoked at most; one broadcast takes up to ``BATCH`` of them.
MAX_WAITING = 10_000
BATCH = 1000
#: Dropped ids are said in the log at most this often.
WARN_EVERY_S = 10.0


class Revoker:
    def __init__(self, app: Any, max_waiting: int = MAX_WAITING) -> None:
        self._app = app
        self._max_waiting = max_waiting
        self._reset()
        reset = weakref.WeakMethod(self._reset)
        os.register_at_fork(after_in_child=lambda: (method := reset()) is not None and method())
        #: Broadcasts that failed (their ids dropped); ids dropped for want of room.
        self.failures = 0
        self.dropped = 0

    def _reset(self) -> None:
        """No thread, no connection, nothing queued: a forked child's inherited ones belong to its parent."""
        self._ids: queue.Queue[str] = queue.Queue(self._max_waiting)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connection: Any = None
        self._unsent = 0
        self._warned_at = float("-inf")
        self._unsaid = 0

    def revoke(self, task_id: str) -> None:
        """Queue ``task_id`` for the next broadcast; never blocks, never raises (a caller's cancellation must stay
        one)."""
        try:
            with self._lock:
                self._unsent += 1
                try:
                    self._ids.put_nowait(task_id)
                except queue.Full:
                    self._unsent -= 1
                    self._drop(task_id)
                    return
                if self._thread is None or not self._thread.is_alive():
                    thread = threading.Thread(target=self._run, name="rerankq-revoke", daemon=True)
                    thread.start()
                    self._thread = thread
        except Exception:  # a thread that cannot start: the job's deadline still applies
            logger.exception("could not revoke job %s (its deadline still applies)", task_id)

    def _drop(self, task_id: str) -> None:
        self.dropped += 1
        self._unsaid += 1
        if time.monotonic() - self._warned_at >= WARN_EVERY_S:
            logger.warning("%d jobs wait to be revoked already: %d more (the last %s) are not; their deadlines still "
                           "apply", self._ids.maxsize, self._unsaid, task_id)
            self._warned_at, self._unsaid = time.monotonic(), 0

    def _run(self) -> None:
        while True:
            ids = [self._ids.get()]
            while len(ids) < BATCH:
                try:
                    ids.append(self._ids.get_nowait())
                except queue.Empty:
                    break
            try:
                self._broadcast(ids)
            finally:
                with self._lock:
                    self._unsent -= len(ids)

    def idle(self) -> bool:
        """Whether every id queued has been broadcast (or dropped with a warning)."""
        with self._lock:
            return self._unsent == 0

    def _broadcast(self, ids: list[str]) -> None:
        try:
            if self._connection is None:
                self._connection = self._app.connection_for_write()
            # Celery's mailbox, bound to this connection and without the producer pool: it publishes on a
            # channel of this connection.
            mailbox = copy.copy(self._app.control.mailbox(self._connection))
            mailbox._producer_pool = None
            mailbox._broadcast("revoke", {"task_id": ids, "terminate": False, "signal": None})
        except Exception as exc:  # Redis away: dropped, each job's deadline still applies
            logger.warning("could not revoke %d jobs whose callers are gone (%r); their deadlines still apply",
                           len(ids), exc)
            self.failures += 1
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.release()
            self._connection = None
