"""Redis Sentinel: a master, a replica and three sentinels (the same redis-server binary, run with
``--sentinel``), every rerankq process given ``sentinel://`` URLs, then the master SIGKILLed: after the
failover jobs keep flowing, and no rerankq process is restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.sentinel

from rerankq.local import RerankqProcess, ServerProcess, WorkerProcess
from rerankq.redis_server import RedisServer, free_port, redis_server_binary
from tests.conftest import eventually, needs_system_redis, new_queue, rerankq
from tests.faults.jobs import (
    Producer,
    a_bulk_run_completes,
    answered,
    each_answered_once,
    flower_shows_a_job,
    route,
    send,
    steady_sends,
    where,
)
from tests.faults.test_hung_redis import served

pytestmark = pytest.mark.integration

MASTER = "mymaster"

#: Jobs a SIGKILLed master may take with it, lost or to be scored again: what it wrote in the moment before its
#: death and had not yet passed to its replica (asynchronous replication; under a millisecond on loopback, and
#: the test's producer sends a job every 20 ms).
REPLICATION_WINDOW = 2


class Sentinels:
    """Three sentinels watching ``master`` (quorum 2), quick to call it down (1 s) and to fail over."""

    def __init__(self, master_port: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="rerankq-sentinel-")
        self.ports = [free_port() for _ in range(3)]
        self._procs = []
        for port in self.ports:
            conf = Path(self._dir.name) / f"sentinel-{port}.conf"
            conf.write_text(textwrap.dedent(f"""\
                port {port}
                bind 127.0.0.1
                dir {self._dir.name}
                sentinel monitor {MASTER} 127.0.0.1 {master_port} 2
                sentinel down-after-milliseconds {MASTER} 1000
                sentinel failover-timeout {MASTER} 5000
                sentinel parallel-syncs {MASTER} 1
                """))
            self._procs.append(subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.sentinel = redis.sentinel.Sentinel([("127.0.0.1", port) for port in self.ports], socket_timeout=1)

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)

    def master_port(self) -> int | None:
        try:
            return int(self.sentinel.discover_master(MASTER)[1])
        except redis.sentinel.MasterNotFoundError:
            return None

    def ready(self) -> bool:
        """Each sentinel knows the master, its replica and the two other sentinels."""
        try:
            for port in self.ports:
                client = redis.Redis(port=port, socket_timeout=1)
                replicas, others = client.sentinel_slaves(MASTER), client.sentinel_sentinels(MASTER)
                if len(replicas) < 1 or len(others) < 2:  # type: ignore[arg-type]
                    return False
            return True
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()
        self._dir.cleanup()


@pytest.fixture
def cluster() -> Iterator[tuple[RedisServer, RedisServer, Sentinels]]:
    with RedisServer() as master, RedisServer() as replica:
        replica_client = redis.Redis(port=replica.port)
        replica_client.replicaof("127.0.0.1", master.port)
        eventually(lambda: replica_client.info("replication")["master_link_status"] == "up", 20, "the replica syncs")
        sentinels = Sentinels(master.port)
        try:
            eventually(sentinels.ready, 30, "the sentinels know the master, its replica and each other")
            yield master, replica, sentinels
        finally:
            sentinels.stop()


def _sentinel_worker(sentinels: Sentinels, tmp_path: Path, name: str) -> tuple[dict[str, str], WorkerProcess]:
    """A simulated worker on a queue of its own, reaching Redis through the sentinels, with 1 s timeouts; and
    the environment its producers take."""
    queue = new_queue()
    env = {"RERANKQ_BROKER_URL": sentinels.url, "RERANKQ_RESULT_BACKEND": sentinels.url,
           "RERANKQ_SENTINEL_MASTER": MASTER, "RERANKQ_GPU_QUEUE": queue, "RERANKQ_POLL_MS": "100",
           "RERANKQ_SOCKET_TIMEOUT_S": "1", "RERANKQ_HEALTH_CHECK_S": "1"}
    return env, WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=5,token_us=0"], env,
                              tmp_path / "worker.log", f"{name}.{queue}@localhost")


def test_jobs_keep_flowing_through_a_sentinel_failover_with_no_process_restarted(
        cluster: tuple[RedisServer, RedisServer, Sentinels], tmp_path: Path) -> None:
    master, replica, sentinels = cluster
    env, worker = _sentinel_worker(sentinels, tmp_path, "sentinel")
    queue = worker.queue
    watchdog = RerankqProcess(["watchdog"], env, tmp_path / "watchdog.log")
    client = sentinels.sentinel.master_for(MASTER, socket_timeout=1)
    try:
        eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
        before = send(env, queue, 20)
        eventually(lambda: where(client, queue, before, worker.node)["answered"] == 20, 30, "served via the sentinels")
        status = rerankq("status", env=env)
        assert status.returncode == 0 and worker.node in status.stdout, status.stdout + status.stderr
        assert _awaited(env, queue) == 5  # await arerank(): the async waiter finds the master too

        assert master.pid is not None  # os.kill(0, ...) would kill the test's own process group
        pid = master.pid
        sent, refused, after_kill = steady_sends(env, queue, lambda: os.kill(pid, signal.SIGKILL),
                                                  until=lambda: sentinels.master_port() == replica.port)
        failed = len(refused)
        after = send(env, queue, 20)
        fresh = sentinels.sentinel.master_for(MASTER, socket_timeout=1)
        eventually(lambda: where(fresh, queue, after, worker.node)["answered"] == 20, 60,
                   "served after the failover")
        ids = before + sent + after
        # Settled: every job answered, or gone with the old master; none waiting, unacked or in flight.
        eventually(lambda: where(fresh, queue, ids, worker.node)["answered"]
                   + _missing(fresh, queue, ids, worker.node) == len(ids), 30,
                   "every job answered or gone")
        lost = _missing(fresh, queue, ids, worker.node)
        print(f"\nfailover: {len(sent)} jobs accepted while it ran ({after_kill} after the kill), {failed} sends "
              f"refused, {lost} accepted and lost")
        assert after_kill >= 10  # sends went on across the failover, not only before it
        assert _awaited(env, queue) == 5
        # Each job answered was scored once (20 before, 5 awaited, those of the failover, 20 after, 5 awaited),
        # but for the few the old master took, or answered, and had not yet passed to the replica when it died:
        # lost, or received again from the in-flight list the replica holds and scored a second time.
        expected = 50 + len(sent) - lost + len(answered(fresh, refused))  # a refused send may have run
        evidence = lambda: (f"served {served(fresh, queue, worker.node)}, expected {expected}, jobs "  # noqa: E731
                            f"{where(fresh, queue, ids, worker.node)}\n{worker.log()[-6000:]}")
        eventually(lambda: served(fresh, queue, worker.node) >= expected, 10, "each job answered scored")
        time.sleep(30 * float(env["RERANKQ_POLL_MS"]) / 1000)  # 30 reports of its figures: a later duplicate shows
        rescored = served(fresh, queue, worker.node) - expected
        print(f"failover: {rescored} job(s) scored a second time")
        assert lost <= REPLICATION_WINDOW and 0 <= rescored <= REPLICATION_WINDOW, evidence()
        assert where(fresh, queue, ids, worker.node)["answered"] == len(ids) - lost, evidence()
        assert worker.proc.poll() is None and watchdog.proc.poll() is None  # never restarted
        # The watchdog sees the worker live again on the new master and routes new jobs to it.
        eventually(lambda: route(env) == f"new jobs go to {queue}", 30, "routed to the worker again")
    finally:
        worker.stop()
        watchdog.stop()


#: How long the test's planned failover pauses writes on the old master: past the sentinels' switch (about a
#: second) and every connection's next check of the master (``sentinel.CHECK_S``) and socket timeout (1 s).
PAUSE_S = 6


def test_a_planned_failover_moves_every_connection_to_the_new_master_and_scores_each_job_once(
        cluster: tuple[RedisServer, RedisServer, Sentinels], tmp_path: Path) -> None:
    """``SENTINEL FAILOVER`` leaves the old master up, accepting writes until the sentinels make it a replica
    (about 10 s). With writes paused there first (RELIABILITY.md), a steady producer loses nothing; and a
    producer whose connection was idle meanwhile sends to the new master, not the old one, once the sentinels
    name it: redis-py alone sent there, the jobs lost when the old master resyncs."""
    master, replica, sentinels = cluster
    env, worker = _sentinel_worker(sentinels, tmp_path, "planned")
    queue = worker.queue
    idle = Producer(env, queue)
    old, new = redis.Redis(port=master.port, socket_timeout=5), redis.Redis(port=replica.port, socket_timeout=5)
    try:
        before = idle.served_first(old, worker)

        def fail_over() -> None:
            old.execute_command("CLIENT", "PAUSE", str(PAUSE_S * 1000), "WRITE")
            assert redis.Redis(port=sentinels.ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER)
        started = time.monotonic()
        sent, refused, _ = steady_sends(env, queue, fail_over, until=lambda: sentinels.master_port() == replica.port)
        failed = len(refused)
        time.sleep(max(0.0, started + PAUSE_S + 0.5 - time.monotonic()))  # the old master takes writes again
        still_master = old.info("replication")["role"] == "master"
        after = idle.send(20)  # on the connection it opened before the failover
        print(f"\nplanned failover: {len(sent)} jobs accepted while it ran, {failed} sends refused; the old "
              f"master {'still' if still_master else 'no longer'} master when the idle producer sent again")
        ids = before + sent + after
        evidence = lambda: (f"on the new master {where(new, queue, ids, worker.node)}, "  # noqa: E731
                            f"on the old {where(old, queue, ids, worker.node)}\n{worker.log()[-6000:]}")
        try:
            each_answered_once(new, queue, worker.node, ids, refused, lambda: served(new, queue, worker.node),
                               30 * float(env["RERANKQ_POLL_MS"]) / 1000, "the planned failover's jobs")
            # Its callers get every answer, from before the failover and after: its result listener, subscribed on
            # the old master, subscribed again on the new one and read what was published meanwhile.
            assert idle.answered() == len(before) + len(after)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{evidence()}") from exc
        assert worker.proc.poll() is None
    finally:
        idle.stop()
        worker.stop()


def test_sentinels_that_hang_delay_no_command(cluster: tuple[RedisServer, RedisServer, Sentinels]) -> None:
    """The sentinels are asked which server is master by a thread of each process: with every sentinel hung,
    a producer's sends go on at Redis's pace. Asked before each command instead, each send waited a socket
    timeout per sentinel, once a second."""
    _, _, sentinels = cluster
    env = {"RERANKQ_BROKER_URL": sentinels.url, "RERANKQ_RESULT_BACKEND": sentinels.url,
           "RERANKQ_SENTINEL_MASTER": MASTER, "RERANKQ_SOCKET_TIMEOUT_S": "1"}
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from rerankq.tasks import rerank
        rerank.apply_async(("q", ["d"]), queue={new_queue()!r})  # connected through the sentinels
        for pid in map(int, sys.argv[1:]):
            os.kill(pid, signal.SIGSTOP)
        longest = 0.0
        for _ in range(20):
            started = time.monotonic()
            rerank.apply_async(("q", ["d"]), queue={new_queue()!r})
            longest = max(longest, time.monotonic() - started)
            time.sleep(0.25)
        print(longest)
    """)
    pids = [str(proc.pid) for proc in sentinels._procs]
    try:
        done = subprocess.run([sys.executable, "-c", script, *pids], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120)
    finally:
        for pid in pids:
            os.kill(int(pid), signal.SIGCONT)
    assert done.returncode == 0, done.stderr[-3000:]
    longest = float(done.stdout.splitlines()[-1])
    # A send takes milliseconds; asking three hung sentinels took three 1 s timeouts.
    assert longest < 1.5, f"a send took {longest:.1f} s with the sentinels hung"


def test_a_bulk_run_flower_and_serve_work_through_the_sentinels(
        cluster: tuple[RedisServer, RedisServer, Sentinels], tmp_path: Path) -> None:
    _, _, sentinels = cluster
    queue = new_queue()
    env = {"RERANKQ_BROKER_URL": sentinels.url, "RERANKQ_SENTINEL_MASTER": MASTER, "RERANKQ_GPU_QUEUE": queue}
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0"], env,
                           tmp_path / "worker.log", f"sentinel-tools.{queue}@localhost")
    server = ServerProcess(free_port(), env, tmp_path / "serve.log")
    try:
        eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
        a_bulk_run_completes(env, tmp_path)
        flower_shows_a_job(env, worker.node, tmp_path)
        server.wait_ready()
        answer = httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": ["q d", "x"]}, timeout=60)
        assert answer.status_code == 200, answer.text + server.log()[-2000:]
    finally:
        server.stop()
        worker.stop()


def _missing(client: redis.Redis, queue: str, ids: list[str], node: str) -> int:
    """Jobs in no queue, no unacked record and with no result (``where`` counts them as lost)."""
    return int(where(client, queue, ids, node)["lost"]) if ids else 0


def _awaited(env: dict[str, str], queue: str) -> int:
    script = textwrap.dedent(f"""
        import asyncio
        from rerankq.producer import arerank
        async def main():
            results = await asyncio.gather(*(arerank("bread", ["bread", "flour"], timeout=30, queue={queue!r})
                                              for _ in range(5)))
            print(sum(1 for r in results if r.scores))
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.splitlines()[-1])


@needs_system_redis  # 7.0+: a cluster bus port of its own (6.2 takes the port + 10000, often past 65535)
@pytest.mark.parametrize("command", [["worker", "--ranker", "simulated"], ["watchdog"], ["status"]])
def test_a_redis_cluster_node_is_refused_at_once_saying_so(command: list[str]) -> None:
    options = ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
    with RedisServer(system=True, options=options) as node:
        done = rerankq(*command, env={"RERANKQ_BROKER_URL": node.url}, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "Redis Cluster" in done.stderr and "Sentinel" in done.stderr


@pytest.mark.parametrize("command", [["worker", "--ranker", "simulated"], ["watchdog"], ["status"]])
def test_a_sentinel_named_as_a_redis_is_refused_at_once_saying_how_to_name_it(
        cluster: tuple[RedisServer, RedisServer, Sentinels], command: list[str]) -> None:
    _, _, sentinels = cluster
    done = rerankq(*command, env={"RERANKQ_BROKER_URL": f"redis://127.0.0.1:{sentinels.ports[0]}/0"}, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "names a Redis Sentinel" in done.stderr and "RERANKQ_SENTINEL_MASTER" in done.stderr
