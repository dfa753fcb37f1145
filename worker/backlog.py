"""Measuring a queue's backlog: jobs waiting in Redis plus jobs live workers hold unacked.

One pipelined round trip per measurement, whatever the number of queues: ``LLEN`` of every priority list
kombu keeps for the queue, and the figures its workers report (``worker/stats.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rerankq.tasks import clock
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import QueueLoad
from rerankq.worker.stats import WorkerStats, live_for, workers_key


@dataclass(frozen=True)
class Snapshot:
    loads: dict[str, QueueLoad]
    #: The live workers of each queue.
    workers: dict[str, list[WorkerStats]]


def measure(broker: BrokerRedis, queues: Sequence[str], poll_s: float) -> Snapshot:
    """The load of each queue. Figures of workers gone for ten times the liveness limit are removed."""
    clock.sync(lambda: broker.client)
    lists = {queue: broker.queue_lists(queue) for queue in queues}
    with broker.client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in lists[queue]:
                pipe.llen(name)
            pipe.hgetall(workers_key(broker, queue))
        replies = iter(pipe.execute())
    now = clock.now()
    loads: dict[str, QueueLoad] = {}
    live: dict[str, list[WorkerStats]] = {}
    dead: dict[str, list[str]] = {}
    for queue in queues:
        waiting = sum(next(replies) for _ in lists[queue])
        reports = [WorkerStats.decode(raw) for raw in next(replies).values()]
        live[queue] = [w for w in reports if now - w.at <= live_for(poll_s)]
        dead[queue] = [w.node for w in reports if now - w.at > 10 * live_for(poll_s)]
        loads[queue] = _load(queue, waiting, live[queue])
    if any(dead.values()):
        with broker.client.pipeline(transaction=False) as pipe:
            for queue, nodes in dead.items():
                if nodes:
                    pipe.hdel(workers_key(broker, queue), *nodes)
            pipe.execute()
    return Snapshot(loads, live)


def _load(queue: str, waiting: int, workers: list[WorkerStats]) -> QueueLoad:
    """A worker's throughput is what it does for whichever lane it serves (bulk makes way for interactive at
    every forward batch); the size of this queue's own jobs, where measured, turns its backlog into pairs."""
    rates = [w.pairs_per_s for w in workers if w.pairs_per_s]
    pairs, jobs = sum(w.pairs for w in workers), sum(w.jobs for w in workers)
    own = [w.per_queue[queue] for w in workers if queue in w.per_queue]
    if sum(counts[1] for counts in own):
        pairs, jobs = sum(counts[0] for counts in own), sum(counts[1] for counts in own)
    return QueueLoad(
        queue=queue,
        waiting=waiting,
        held=sum(w.held.get(queue, 0) for w in workers),
        workers=len(workers),
        pairs_per_s=round(sum(rates), 3) if rates else None,
        pairs_per_job=round(pairs / jobs, 3) if jobs else None,
    )
