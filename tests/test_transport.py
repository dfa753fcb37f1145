"""The receiving transport against a real Redis, driven as kombu's event loop drives it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.utils.url import parse_url

from rerankq import celeryconfig
from rerankq.tasks import lanes, rerank, sentinel
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker import inflight
from rerankq.worker.upstream import acks, transport
from tests.conftest import eventually, new_queue

pytestmark = pytest.mark.integration

JOB = ("bread", ["flour"])
OWNER = f"test-transport-{uuid.uuid4().hex[:8]}@localhost"


@pytest.fixture
def connection(redis_url: str) -> Iterator[Connection]:
    parts: dict[str, Any] = dict(parse_url(redis_url))
    parts["transport"] = transport.Transport
    options = {**celeryconfig.broker_options(celeryconfig.settings), **transport.options(OWNER, bulk_limit=None)}
    with Connection(**parts, transport_options=options) as connection:
        yield connection


def consume(connection: Connection, queue: str, then: Callable[[Any], None] | None = None) -> tuple[Any, list[Any]]:
    """A channel consuming ``queue``, and the list each message it receives is appended to (then passed to
    ``then``)."""
    channel: Any = connection.channel()
    received: list[Any] = []

    def callback(message: Any) -> None:
        received.append(message)
        if then is not None:
            then(message)

    channel.basic_consume(queue, no_ack=False, callback=callback, consumer_tag="test")
    return channel, received


@pytest.fixture
def broker(celery_app: Any) -> Iterator[BrokerRedis]:
    broker = BrokerRedis(celery_app)
    yield broker
    broker.close()


def test_a_received_job_is_unacked_and_off_the_in_flight_list_and_a_reply_lost_with_its_connection_comes_again(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()
    channel, received = consume(connection, queue)
    sent = rerank.apply_async(JOB, queue=queue)
    source = broker.queue_lists(queue)[0]

    # A receive whose reply never arrives: kombu drops such a stale connection, its reply unread.
    channel.client.connection = channel.client.connection_pool.get_connection()
    channel._brpop_start(timeout=1)
    eventually(lambda: broker.client.llen(source) == 0, 5, "Redis moved the job to the in-flight list")
    channel.client.connection.disconnect()
    connection.drain_events(timeout=5)  # the event loop reconnects; the next receive puts the job back first

    assert [m.headers["id"] for m in received] == [sent.id]
    in_flight = inflight.list_key(broker.prefix, OWNER, queue)
    assert broker.client.llen(in_flight) == 0
    _index, unacked = broker.unacked_keys()
    assert broker.client.hexists(unacked, received[0].delivery_tag)
    received[0].ack()
    assert not broker.client.hexists(unacked, received[0].delivery_tag)


def consume_lanes(connection: Connection, queue: str) -> tuple[Any, list[Any]]:
    """A channel consuming both lanes of ``queue``, as a worker does."""
    channel: Any = connection.channel()
    received: list[Any] = []
    for n, lane in enumerate(lanes.both([queue])):
        channel.basic_consume(lane, no_ack=False, callback=received.append, consumer_tag=f"test{n}")
    return channel, received


def test_a_channel_consuming_several_queues_receives_from_each_in_one_receive(connection: Connection) -> None:
    queues = [new_queue(), new_queue()]
    channel: Any = connection.channel()
    received: list[Any] = []
    for n, queue in enumerate(queues):
        channel.basic_consume(queue, no_ack=False, callback=received.append, consumer_tag=f"test{n}")
    sent = {rerank.apply_async(JOB, queue=queue).id for queue in queues}
    connection.drain_events(timeout=5)
    assert {m.headers["id"] for m in received} == sent
    for message in received:
        message.ack()


def test_interactive_jobs_are_received_before_bulk_ones_and_bulk_ones_only_up_to_the_bulk_limit(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()
    options: dict[str, Any] = connection.transport_options or {}
    options["rerankq_bulk_limit"] = 2
    channel, received = consume_lanes(connection, queue)
    channel.basic_qos(prefetch_count=10)
    bulk = [rerank.apply_async(JOB, queue=queue, lane="bulk").id for _ in range(5)]
    interactive = [rerank.apply_async(JOB, queue=queue).id for _ in range(3)]

    connection.drain_events(timeout=5)
    assert [m.headers["id"] for m in received] == interactive + bulk[:2]
    assert broker.client.llen(broker.queue_lists(lanes.queue_for(queue, "bulk"))[0]) == 3  # over the limit

    # Held bulk jobs leave room: a new interactive job comes in; a bulk one only once a bulk job is acked.
    late = rerank.apply_async(JOB, queue=queue).id
    connection.drain_events(timeout=5)
    assert received[-1].headers["id"] == late
    received[3].ack()
    connection.drain_events(timeout=5)
    assert [m.headers["id"] for m in received[-1:]] == bulk[2:3]
    for message in received:
        if message is not received[3]:
            message.ack()


def test_a_bulk_job_sent_to_an_idle_worker_comes_while_it_waits_on_the_interactive_lane(
        connection: Connection) -> None:
    queue = new_queue()
    _channel, received = consume_lanes(connection, queue)
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.3)  # nothing anywhere: it now blocks on the interactive lane
    sent = rerank.apply_async(JOB, queue=queue, lane="bulk").id
    connection.drain_events(timeout=5)
    assert [m.headers["id"] for m in received] == [sent]
    received[0].ack()


def test_jobs_waiting_together_come_in_one_receive_within_prefetch_each_recorded_as_unacked(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()
    channel, received = consume(connection, queue)
    channel.basic_qos(prefetch_count=3)
    sent = [rerank.apply_async(JOB, queue=queue).id for _ in range(5)]

    connection.drain_events(timeout=5)

    assert [m.headers["id"] for m in received] == sent[:3]  # in queue order, up to the prefetch
    _index, unacked = broker.unacked_keys()
    assert all(broker.client.hexists(unacked, m.delivery_tag) for m in received)
    assert broker.client.llen(inflight.list_key(broker.prefix, OWNER, queue)) == 0
    assert broker.client.llen(broker.queue_lists(queue)[0]) == 2
    for message in received:
        message.ack()
    connection.drain_events(timeout=5)
    assert [m.headers["id"] for m in received] == sent


def test_a_consumer_that_raises_on_one_job_still_gets_the_others_of_its_receive(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()

    def fail_the_first(message: Any) -> None:
        if len(received) == 1:
            raise RuntimeError("the consumer's own failure")

    _channel, received = consume(connection, queue, then=fail_the_first)
    sent = [rerank.apply_async(JOB, queue=queue).id for _ in range(3)]
    with pytest.raises(RuntimeError, match="the consumer's own failure"):
        connection.drain_events(timeout=5)
    assert [m.headers["id"] for m in received] == sent
    _index, unacked = broker.unacked_keys()
    assert all(broker.client.hexists(unacked, m.delivery_tag) for m in received)


def test_a_chunk_acked_in_one_round_trip_is_not_acked_in_redis_again_job_by_job(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()
    channel, received = consume(connection, queue)
    for _ in range(3):
        rerank.apply_async(JOB, queue=queue)
    connection.drain_events(timeout=5)
    index, unacked = broker.unacked_keys()

    acks.ack_in_redis(broker.client, (index, unacked), received)
    assert not any(broker.client.hexists(unacked, m.delivery_tag) for m in received)
    broker.client.zadd(index, {received[0].delivery_tag: 1.0})  # a command each ack() would remove again
    for message in received:
        message.ack()
    assert broker.client.zscore(index, received[0].delivery_tag) == 1.0
    assert {m.delivery_tag for m in received} <= channel.qos._dirty  # kombu's bookkeeping still done
    broker.client.zrem(index, received[0].delivery_tag)


def test_an_ack_removes_only_its_own_deliverys_record_not_a_later_one_of_the_same_job(
        connection: Connection, broker: BrokerRedis) -> None:
    """Every delivery of a job carries its delivery tag: a job put back (a reconnect, a reclaim) and received
    again has a new record under the same tag, which the first delivery's late ack must leave alone."""
    queue = new_queue()
    _, received = consume(connection, queue)
    for _ in range(2):
        rerank.apply_async(JOB, queue=queue)
    connection.drain_events(timeout=5)
    first, second = received
    index, unacked = broker.unacked_keys()
    later = first.delivered_at + 5
    broker.client.zadd(index, {first.delivery_tag: later, second.delivery_tag: later})  # received again since

    acks.ack_in_redis(broker.client, (index, unacked), [first])
    second.ack()
    assert broker.client.zscore(index, first.delivery_tag) == later
    assert broker.client.zscore(index, second.delivery_tag) == later
    assert broker.client.hexists(unacked, first.delivery_tag) and broker.client.hexists(unacked, second.delivery_tag)

    broker.client.zadd(index, {first.delivery_tag: first.delivered_at})  # its own record again
    acks.ack_in_redis(broker.client, (index, unacked), [first])
    assert broker.client.zscore(index, first.delivery_tag) is None
    assert not broker.client.hexists(unacked, first.delivery_tag)
    broker.client.zrem(index, second.delivery_tag)
    broker.client.hdel(unacked, second.delivery_tag)


def test_a_late_ack_of_a_job_received_again_on_the_same_channel_leaves_the_new_delivery_alone(
        connection: Connection, broker: BrokerRedis) -> None:
    queue = new_queue()
    channel, received = consume(connection, queue)
    rerank.apply_async(JOB, queue=queue)
    connection.drain_events(timeout=5)
    assert broker.restore(received[0].delivery_tag, float("inf"))  # reclaimed, as from a worker taken for dead
    connection.drain_events(timeout=5)
    old, new = received
    assert old.delivery_tag == new.delivery_tag and new.delivered_at > old.delivered_at
    index, unacked = broker.unacked_keys()

    old.ack()
    assert old.acknowledged
    assert broker.client.zscore(index, new.delivery_tag) == new.delivered_at
    assert channel.qos._delivered[new.delivery_tag] is new
    new.ack()
    assert broker.client.zscore(index, new.delivery_tag) is None
    assert not broker.client.hexists(unacked, new.delivery_tag)


def test_a_job_a_late_receive_left_in_the_in_flight_list_comes_with_the_next_receive(
        connection: Connection, broker: BrokerRedis) -> None:
    """A receive that timed out can still run once a hung Redis wakes, after the worker gave up on it and
    put back what it knew of: what it moved sits in the worker's in-flight list, where nothing else looks."""
    queue = new_queue()
    _, received = consume(connection, queue)
    late, then = rerank.apply_async(JOB, queue=queue), rerank.apply_async(JOB, queue=queue)
    source, in_flight = broker.queue_lists(queue)[0], inflight.list_key(broker.prefix, OWNER, queue)
    broker.client.lmove(source, in_flight, "RIGHT", "LEFT")  # the late move, done as Redis woke

    for _ in range(2):
        connection.drain_events(timeout=5)
        if len(received) == 2:
            break
    assert [m.headers["id"] for m in received] == [late.id, then.id]
    assert broker.client.llen(in_flight) == 0
    _index, unacked = broker.unacked_keys()
    assert all(broker.client.hexists(unacked, m.delivery_tag) for m in received)
    for message in received:
        message.ack()


@pytest.mark.parametrize("urls", ["sentinel://127.0.0.1:1;sentinel://127.0.0.1:2",
                                  "redis://127.0.0.1:1;redis://127.0.0.1:2"])
def test_a_worker_connection_keeps_rerankqs_transport_when_it_moves_to_the_next_url(urls: str) -> None:
    """On a failover kombu moves a connection to the next URL (``maybe_switch_next``), taking the transport
    from the URL's scheme: a worker's connections keep rerankq's receive across it."""
    url, cls = transport.for_url(urls)
    moved = sentinel.Connection(url, transport=cls)
    plain = Connection(url, transport=cls)
    expected = transport.SentinelTransport if urls.startswith("sentinel") else transport.Transport
    for connection in (moved, plain):
        assert connection.transport.__class__ is expected
        connection.maybe_switch_next()
    assert moved.transport.__class__ is expected and moved.clone().transport.__class__ is expected
    assert plain.transport.__class__ is not expected  # kombu's own: the reason rerankq's Connection exists
    assert json.dumps(moved.info())  # `celery inspect stats` carries it
