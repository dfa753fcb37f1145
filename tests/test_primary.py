"""Connections that leave a server made a replica in place (tasks/primary.py), on a real Redis that is a replica
(of a port nobody listens at: it refuses writes as a demoted master does)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu.connection import Connection

from rerankq import celeryconfig
from rerankq.redis_server import RedisServer, free_port
from rerankq.tasks import primary
from rerankq.tasks.app import app
from rerankq.tasks.connections import refuse_unusable
from rerankq.worker.upstream import transport


@pytest.fixture(scope="module")
def replica() -> Iterator[RedisServer]:
    with RedisServer() as server:
        redis.Redis(port=server.port).replicaof("127.0.0.1", free_port())
        yield server


@pytest.mark.parametrize(("reply", "demoted"), [
    (redis.ReadOnlyError("You can't write against a read only replica."), True),
    (redis.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed (master -> "
                         "replica?)"), True),
    # A script's error before Redis 7 carries the refusal inside it.
    (redis.ResponseError("Error running script (call to f_0): @user_script:1: -READONLY You can't write against a "
                         "read only replica."), True),
    (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), False),
    (redis.ResponseError("NOSCRIPT No matching script."), False),
    (redis.ResponseError("Transaction contains write commands but instance is now a read-only replica. EXEC "
                         "aborted."), True),
])
def test_a_replicas_refusals_and_nothing_else_are_a_demotion(reply: redis.ResponseError, demoted: bool) -> None:
    assert primary.demoted(reply) is demoted


def test_a_write_to_a_replica_drops_the_connection_as_lost_and_reads_go_on(replica: RedisServer) -> None:
    pool = redis.ConnectionPool(port=replica.port, connection_class=primary.PrimaryConnection)
    client = redis.Redis(connection_pool=pool)
    assert client.get("missing") is None
    with pytest.raises(primary.Demoted, match="is a replica now"):
        client.set("key", "value")
    assert all(c._sock is None for c in pool._available_connections)  # dropped: the next one connects afresh
    pipe = client.pipeline(transaction=False)
    pipe.set("a", 1)
    pipe.set("b", 2)
    with pytest.raises(primary.Demoted):  # not a reply among the others: the pipeline fails as a lost connection
        pipe.execute(raise_on_error=False)
    assert client.get("missing") is None
    # A refusal after a command that ran (a replica runs PUBLISH) is not sent again: that command would run twice.
    subscriber = redis.Redis(port=replica.port).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe("events")
    pipe = redis.Redis(connection_pool=redis.ConnectionPool(port=replica.port,
                                                             connection_class=primary.PrimaryConnection)).pipeline(False)
    pipe.publish("events", "once")
    pipe.set("key", "value")
    with pytest.raises(primary.Demoted):
        pipe.execute()
    received = [subscriber.get_message(timeout=0.5) for _ in range(3)]
    assert [m["data"] for m in received if m] == [b"once"]
    # redis-py's own connection keeps the socket, and only a ResponseError says why.
    plain = redis.Redis(port=replica.port)
    with pytest.raises(redis.ReadOnlyError):
        plain.set("key", "value")
    assert not isinstance(redis.ReadOnlyError(), redis.ConnectionError)


def test_once_a_demotion_is_met_every_connection_opened_before_it_leaves_its_server() -> None:
    """A connection that only publishes (Celery's heartbeats) is never refused by a replica: it must leave all
    the same once another connection of the process found the server demoted."""
    with RedisServer() as server:
        pool = redis.ConnectionPool(port=server.port, connection_class=primary.PrimaryConnection)
        writer, publisher, pooled = (pool.get_connection() for _ in range(3))
        for connection in (writer, publisher, pooled):
            connection.send_command("PUBLISH", "events", "before")
            assert connection.read_response() == 0
        pool.release(pooled)
        old_socket = pooled._sock
        redis.Redis(port=server.port).replicaof("127.0.0.1", free_port())
        publisher.send_command("PUBLISH", "events", "accepted by a replica")
        assert publisher.read_response() == 0
        writer.send_command("SET", "key", "value")
        with pytest.raises(primary.Demoted):
            writer.read_response()
        with pytest.raises(primary.OpenedBefore, match="before a server was found demoted"):
            publisher.send_command("PUBLISH", "events", "after")
        assert publisher._sock is None
        publisher.send_command("PUBLISH", "events", "after")  # a new socket: current, kept
        assert publisher.read_response() == 0
        publisher.send_command("PUBLISH", "events", "again")
        assert publisher.read_response() == 0
        # Through a client, the command is sent again once, reconnected: its caller sees no error.
        assert redis.Redis(connection_pool=pool).publish("events", "sent again") == 0
        assert pooled._sock is not None and pooled._sock is not old_socket


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", "rerankq.tasks.primary:Transport"),
    ("rediss://127.0.0.1:6379/0", "rerankq.tasks.primary:Transport"),
    ("sentinel://127.0.0.1:26379", "rerankq.tasks.sentinel:SentinelTransport"),
    ("redis+socket:///tmp/redis.sock", None),
])
def test_every_producer_connects_by_the_transport_of_its_url(url: str, expected: str | None) -> None:
    assert celeryconfig.transport(url) == expected


def test_producers_workers_and_results_reach_redis_by_primary_connections(replica: RedisServer) -> None:
    url = f"redis://127.0.0.1:{replica.port}/0"
    for cls in (celeryconfig.transport(url), transport.for_url(url)[1]):
        with Connection(url, transport=cls) as connection:
            pool = connection.default_channel.client.connection_pool
            assert issubclass(pool.connection_class, primary.PrimaryConnection), cls
    backend = app.loader.override_backends["redis"]
    assert backend == app.loader.override_backends["rediss"] == "rerankq.tasks.primary:Backend"
    plain = primary.Backend(app=app, url=url)
    assert plain.client.connection_pool.connection_class is primary.PrimaryConnection
    with pytest.raises(primary.Demoted):  # Celery's backend retries it as a lost connection, for its retry policy
        plain.client.set("celery-task-meta-x", "{}")
    tls = primary.Backend(app=app, url=celeryconfig.verified("rediss://127.0.0.1:1/0"))
    assert tls.connparams["connection_class"] is primary.PrimarySSLConnection


def test_a_process_started_on_a_replica_says_so_and_waits_for_a_primary(replica: RedisServer,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A failover under way may leave the address on a replica for a moment: a process starting then says so and
    is not refused (a refusal would stop it for good), nor is one on a primary told anything."""
    with RedisServer() as master:
        for port, said in ((replica.port, True), (master.port, False)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="rerankq.tasks.connections"):
                refuse_unusable(Celery("probe", broker=f"redis://127.0.0.1:{port}/0"))
            assert ("reaches a read-only replica" in caplog.text) is said
