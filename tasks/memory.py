"""A full Redis (``maxmemory`` reached under ``noeviction``): what rerankq still gets through, and how it says so.

Redis then refuses every command that may grow memory (those flagged ``denyoom``: LPUSH, LMOVE, BLMOVE, HSET,
SETEX, a MULTI holding one, a script's first such write), and still runs reads, deletes, pops and PUBLISH.
Moving a job that is in Redis already (from its queue to a worker, into kombu's unacked record, back to its
queue) adds no memory worth refusing, so rerankq runs each such move as one Lua script flagged ``allow-oom``
(Redis 7+): a full Redis never strands a job between two places, and workers keep receiving what is queued.
What does grow memory, a new job or a new result, is refused: producers get ``RedisFull``; a worker puts a job
whose result it cannot write back on its queue for later. On Redis 6.2 (no script flags) the moves are refused
too, atomically: nothing is lost, and workers wait for memory instead of receiving.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from rerankq.tasks import scripts
from rerankq.tasks.errors import RedisFull, causes

#: Scripts carrying it run on a full Redis 7+, their commands included.
_ALLOW_OOM = "#!lua flags=allow-oom\n"
_flags_known: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

_RUN = scripts.lua("run_commands")


def is_full(exc: BaseException) -> bool:
    """Whether Redis refused a command for want of memory (``-OOM``, in a pipeline or a script too, or behind
    the error kombu or Celery raised for it)."""
    return any(isinstance(seen, redis.OutOfMemoryError) or (isinstance(seen, redis.ResponseError)
                                                            and "used memory > 'maxmemory'" in str(seen))
               for seen in causes(exc))


def script(client: redis.Redis, body: str) -> str:
    """``body`` flagged to run on a full Redis where the server knows script flags (7.0+)."""
    pool = client.connection_pool
    if pool not in _flags_known:
        try:
            version = str(client.info("server").get("redis_version", "0"))
            _flags_known[pool] = int(version.split(".")[0]) >= 7
        except (redis.ResponseError, ValueError):
            _flags_known[pool] = False  # a server that hides its version: the script runs unflagged
    return _ALLOW_OOM + body if _flags_known[pool] else body


def run_atomically(client: redis.Redis, commands: Sequence[Sequence[Any]]) -> None:
    """Run ``commands`` as one atomic step (like a MULTI) that a full Redis 7+ still runs: only for commands
    that move what Redis holds already."""
    if not commands:
        return
    argv: list[Any] = []
    for command in commands:
        argv += [len(command), *command]
    client.eval(script(client, _RUN), 0, *argv)


@dataclass(frozen=True)
class Memory:
    used: int
    limit: int  #: ``maxmemory``; 0 is none
    policy: str

    @property
    def full(self) -> bool:
        """Refusing writes: at the limit with nothing it may evict."""
        return self.limit > 0 and self.used >= self.limit and self.policy == "noeviction"

    def describe(self) -> str:
        if self.limit == 0:
            return f"{self.used / 2**20:.1f} MiB used, no maxmemory"
        state = "FULL: refusing new jobs and results" if self.full else f"{self.used / self.limit:.0%}"
        return f"{self.used / 2**20:.1f} of {self.limit / 2**20:.1f} MiB maxmemory ({self.policy}): {state}"


def memory(client: redis.Redis) -> Memory:
    info: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
    return Memory(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)),
                  str(info.get("maxmemory_policy", "")))


def refused(exc: BaseException, where: str) -> RedisFull:
    """The error a producer gets for a job Redis refused for want of memory."""
    return RedisFull(f"Redis at {where} is out of memory (maxmemory reached, policy noeviction) and refuses new "
                     f"jobs until workers drain the queues or the limit is raised (CONFIG SET maxmemory); "
                     f"`rerankq status` shows its memory ({exc})")
