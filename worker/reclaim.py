"""Reclaiming jobs no live worker holds: a worker killed, or one that dropped a job in a reconnect.

kombu keeps every delivered, unacked job in an index and a hash, and redelivers one only after the
visibility timeout (an hour by default), since it cannot tell a slow worker from a dead one. rerankq's
workers report the delivery tags they hold every poll, so the watchdog can: a rerank job delivered more
than ``grace_s`` ago that no live worker reports holding is put back at the head of its queue at once
(taken next: it has waited already). Each poll looks at a bounded page of the unacked index, the next
page the next poll. A
job reclaimed from a worker that was only slow is scored twice, which is harmless (its result is
written twice); jobs of other apps sharing the Redis are never touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

from rerankq.tasks import clock
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.rerank import TASK_NAME
from rerankq.worker.stats import WorkerStats

logger = logging.getLogger(__name__)


#: Unacked jobs one reclaim looks at, at most: the index is shared by every queue and app on the Redis.
RECLAIM_SCAN = 1000


def reclaim(broker: BrokerRedis, queues: Sequence[str], live: Iterable[WorkerStats], grace_s: float,
            offset: int = 0, limit: int = RECLAIM_SCAN) -> tuple[list[str], int]:
    """Put back the orphaned rerank jobs of ``queues`` among at most ``limit`` due deliveries, from
    ``offset`` in the index (oldest first). Returns their task ids and the offset to scan from next time
    (0 once the end of the due ones is reached)."""
    index_key, hash_key = broker.unacked_keys()
    cutoff = clock.now() - grace_s
    due: list[bytes] = broker.client.zrangebyscore(  # type: ignore[assignment]
        index_key, "-inf", cutoff, start=offset, num=limit)
    candidates = [tag.decode() for tag in due]
    held = {tag for worker in live for tag in worker.tags}
    orphans = [tag for tag in candidates if tag not in held]
    reclaimed = []
    if orphans:
        jobs = [(tag, _rerank_job(raw, queues)) for tag, raw in zip(orphans, broker.client.hmget(hash_key, orphans),
                                                                   strict=True)]
        # Newest first, so that the oldest ends at the very head. A job no longer due (another watchdog put it
        # back and a worker took it again) is left alone.
        restored = {tag for tag, job in reversed(jobs) if job is not None and broker.restore(tag, cutoff)}
        reclaimed = [job for tag, job in jobs if tag in restored and job is not None]
    if reclaimed:
        logger.warning("put back %d job(s) no live worker holds, delivered over %.0fs ago: %s", len(reclaimed),
                       grace_s, ", ".join(reclaimed[:5]) + (" ..." if len(reclaimed) > 5 else ""))
    # What was put back left the index: the next scan starts past what stays of this one.
    return reclaimed, offset + len(candidates) - len(reclaimed) if len(candidates) == limit else 0


def _rerank_job(raw: bytes | str | None, queues: Sequence[str]) -> str | None:
    """The task id, if ``raw`` is kombu's record of a rerank job from one of ``queues``."""
    if raw is None:
        return None
    try:
        message, _exchange, routing_key = json.loads(raw)
        headers = message.get("headers") or {}
        if headers.get("task") == TASK_NAME and routing_key in queues:
            return str(headers.get("id"))
    except (ValueError, TypeError, AttributeError):
        pass
    return None
