"""In-flight lists: where a job waits between leaving its queue and kombu recording it as unacked.

kombu's Redis transport receives with ``BRPOP`` and records the job in its unacked hash with a second
command; a worker killed between the two (the reply still in its socket) loses the job. rerankq's
workers receive with ``BLMOVE`` instead (worker/upstream/transport.py), which moves the job atomically into the
worker's own in-flight list; the unacked record and the removal from that list are then one
transaction. Whatever is left in an in-flight list belongs to a worker that died between the two steps.

Each list is registered in the hash ``rerankq:inflight`` (list key -> its source queue list and when
its worker last reported). Every worker refreshes its own entries each poll and puts back the lists of
workers that stopped reporting (``reclaim``); a worker starting under the name of one that died takes
its own list back at once.
"""

from __future__ import annotations

import json
import threading

import redis

from rerankq.tasks import clock, memory, scripts
from rerankq.tasks.connections import rerankq_key

#: This process's in-flight lists: list key -> the queue list it receives from.
_owned: dict[str, str] = {}
_owned_lock = threading.Lock()
_RESTORE = scripts.lua("restore_in_flight")


def registry_key(prefix: str) -> str:
    return rerankq_key(prefix, "inflight")


def list_key(prefix: str, owner: str, queue: str) -> str:
    return rerankq_key(prefix, "inflight", owner, queue)


def adopt(client: redis.Redis, prefix: str, key: str, source: str) -> int:
    """Make ``key`` one of this process's in-flight lists: put back what a predecessor of the same name
    left in it, and register it. Returns how many jobs went back."""
    restored = restore(client, key, source)
    with _owned_lock:
        _owned[key] = source
    memory.run_atomically(client, [("HSET", registry_key(prefix), key, _entry(source))])
    return restored


def beats(prefix: str) -> list[tuple[str, ...]]:
    """The commands saying 'still alive' for each of this process's lists (a full Redis still runs them)."""
    with _owned_lock:
        owned = dict(_owned)
    return [("HSET", registry_key(prefix), key, _entry(source)) for key, source in owned.items()]


def restore(client: redis.Redis, key: str, source: str) -> int:
    """Move every job in the in-flight list ``key`` back to the head of its queue (the right end, where
    workers take from), in one atomic step a full Redis still runs, newest first so that the oldest is
    taken next."""
    return int(client.eval(memory.script(client, _RESTORE), 2, key, source))  # type: ignore[arg-type]


def reclaim(client: redis.Redis, prefix: str, dead_after_s: float) -> int:
    """Put back the in-flight jobs of workers that last reported over ``dead_after_s`` ago."""
    registry = registry_key(prefix)
    entries: dict[bytes, bytes] = client.hgetall(registry)  # type: ignore[assignment]
    moved = 0
    for key, raw in entries.items():
        entry = json.loads(raw)
        if entry["seen"] > clock.now() - dead_after_s:
            continue
        moved += restore(client, key.decode(), entry["source"])
        # A worker that was only stalled registers again with its next report.
        client.hdel(registry, key)
    return moved


def _entry(source: str) -> str:
    return json.dumps({"source": source, "seen": clock.now()})
