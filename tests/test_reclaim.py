"""Reclaiming orphaned jobs against a real Redis: real kombu deliveries left unacked, worker reports."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from kombu.connection import Connection

from rerankq.tasks import rerank
from rerankq.tasks.connections import BrokerRedis, restore_unacked
from rerankq.worker import inflight
from rerankq.worker.reclaim import reclaim
from rerankq.worker.stats import WorkerStats
from tests.conftest import new_queue

pytestmark = pytest.mark.integration


def test_only_rerank_jobs_no_live_worker_holds_are_put_back(celery_app: Any) -> None:
    gpu, other_queue = new_queue(), new_queue()
    sent = [rerank.apply_async(("q", ["d"]), queue=gpu) for _ in range(3)]
    stranger = rerank.apply_async(("q", ["d"]), queue=other_queue)  # a rerank job, but not of these queues
    with Connection(celery_app.conf.broker_url) as connection:
        channel = connection.channel()
        celery_app.send_task("someone.elses.task", queue=gpu)  # another app's task on the same queue
        delivered = [channel.basic_get(gpu, no_ack=False) for _ in range(4)]
        delivered.append(channel.basic_get(other_queue, no_ack=False))
        by_task = {m.headers["id"]: m.delivery_tag for m in delivered}
        holder = WorkerStats(node="w@h", ranker="simulated", model="m", device="cpu", held={gpu: 1}, pairs=0,
                             jobs=0, busy_s=0.0, served=0, tags=[by_task[sent[0].id]])
        broker = BrokerRedis(celery_app)
        reclaimed, _ = reclaim(broker, [gpu], [holder], grace_s=0.0)

        assert sorted(reclaimed) == sorted([sent[1].id, sent[2].id])
        back = [json.loads(raw)["headers"]["id"] for raw in broker.client.lrange(gpu, 0, -1)]
        assert sorted(back) == sorted(reclaimed)
        index_key, _ = broker.unacked_keys()
        still_unacked = {t.decode() for t in broker.client.zrange(index_key, 0, -1)}  # type: ignore[union-attr]
        assert by_task[sent[0].id] in still_unacked and by_task[stranger.id] in still_unacked
        assert reclaim(broker, [gpu], [holder], grace_s=3600.0) == ([], 0)  # nothing is due yet
        for message in delivered:  # leave Redis clean
            message.ack()
        broker.client.delete(*broker.queue_lists(gpu))
        broker.close()


def test_a_reclaimed_job_goes_to_the_head_of_its_queue_and_each_scan_reads_a_bounded_page(celery_app: Any) -> None:
    queue = new_queue()
    for _ in range(3):
        rerank.apply_async(("q", ["d"]), queue=queue)
    broker = BrokerRedis(celery_app)
    with Connection(celery_app.conf.broker_url) as connection:
        channel = connection.channel()
        delivered = [channel.basic_get(queue, no_ack=False) for _ in range(3)]  # then their worker died
        orphans = [message.headers["id"] for message in delivered]  # oldest delivery first
        waiting = [rerank.apply_async(("q", ["d"]), queue=queue).id for _ in range(2)]
        index_key, _ = broker.unacked_keys()
        for n, message in enumerate(delivered):  # delivered before anything else unacked in this Redis
            broker.client.zadd(index_key, {message.delivery_tag: n})

        first, offset = reclaim(broker, [queue], [], grace_s=0.0, limit=2)
        assert (first, offset) == (orphans[:2], 0 + 2 - 2)
        second, _ = reclaim(broker, [queue], [], grace_s=0.0, limit=2)
        assert second == orphans[2:]

        # Workers take from the right end: each scan's jobs go to the head, oldest first, ahead of the two that
        # waited meanwhile.
        taken = [json.loads(raw)["headers"]["id"] for raw in reversed(broker.client.lrange(queue, 0, -1))]
        assert taken == [orphans[2], orphans[0], orphans[1], *waiting]
        broker.client.delete(*broker.queue_lists(queue))
    broker.close()


def test_a_job_put_back_and_taken_again_is_not_put_back_a_second_time_by_a_late_watchdog(celery_app: Any) -> None:
    queue = new_queue()
    rerank.apply_async(("q", ["d"]), queue=queue)
    broker = BrokerRedis(celery_app)
    with Connection(celery_app.conf.broker_url) as connection:
        channel = connection.channel()
        first = channel.basic_get(queue, no_ack=False)
        cutoff = time.time() + 1  # what two watchdogs computed: the delivery is due
        assert broker.restore(first.delivery_tag, cutoff)  # the first puts it back...
        again = channel.basic_get(queue, no_ack=False)  # ...a worker takes it again, under the same tag...
        assert again.delivery_tag == first.delivery_tag
        broker.client.zadd(broker.unacked_keys()[0], {again.delivery_tag: cutoff + 10})  # ...delivered later
        assert not broker.restore(first.delivery_tag, cutoff)  # the second, late, leaves it with that worker
        assert broker.client.llen(queue) == 0
        assert broker.client.hexists(broker.unacked_keys()[1], again.delivery_tag)
        again.ack()
    broker.close()


def test_in_flight_jobs_of_workers_gone_quiet_go_back_to_their_queue_and_live_ones_stay(celery_app: Any) -> None:
    broker = BrokerRedis(celery_app)
    prefix = f"{new_queue()}:"  # a registry of its own: the suite's live workers reclaim the shared one
    source = prefix + new_queue()
    dead, live = inflight.list_key(prefix, "dead@h", source), inflight.list_key(prefix, "live@h", source)
    registry = inflight.registry_key(prefix)
    try:
        broker.client.lpush(dead, "job-1", "job-2")
        broker.client.lpush(live, "job-3")
        broker.client.hset(registry, dead, json.dumps({"source": source, "seen": time.time() - 60}))
        broker.client.hset(registry, live, json.dumps({"source": source, "seen": time.time()}))

        assert inflight.reclaim(broker.client, prefix, dead_after_s=30) == 2
        assert broker.client.lrange(source, 0, -1) == [b"job-2", b"job-1"]  # job-1, the older, is next
        assert broker.client.llen(dead) == 0 and broker.client.llen(live) == 1
        assert broker.client.hkeys(registry) == [live.encode()]
    finally:
        broker.client.delete(source, dead, live, registry)
        broker.close()


def test_a_worker_puts_back_only_its_own_delivery_of_a_job(celery_app: Any) -> None:
    """The worker's requeue names its delivery by its record's exact time: a job reclaimed meanwhile and taken
    again under the same tag (a later record) is left with its new holder."""
    queue = new_queue()
    rerank.apply_async(("q", ["d"]), queue=queue)
    broker = BrokerRedis(celery_app)
    with Connection(celery_app.conf.broker_url) as connection:
        channel = connection.channel()
        mine = channel.basic_get(queue, no_ack=False)
        index_key, hash_key = broker.unacked_keys()
        at = 1_700_000_000.123456
        broker.client.zadd(index_key, {mine.delivery_tag: math.nextafter(at, 0)})  # another delivery's record
        assert not restore_unacked(broker._channel, broker.client, mine.delivery_tag, at, math.nextafter(at, 2 * at))
        broker.client.zadd(index_key, {mine.delivery_tag: at})  # this delivery's own record
        assert restore_unacked(broker._channel, broker.client, mine.delivery_tag, at, math.nextafter(at, 2 * at))
        assert broker.client.llen(queue) == 1 and not broker.client.hexists(hash_key, mine.delivery_tag)
        broker.client.delete(*broker.queue_lists(queue))
    broker.close()
