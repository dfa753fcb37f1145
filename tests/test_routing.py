"""Routing end to end: real worker processes (a simulated GPU held slow, the real fast ranker), a real
`rerankq watchdog`, and producers calling `rerank.delay`."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rerankq.celeryconfig import Settings
from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.status import gather
from rerankq.tasks import Result, lanes, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import Router, RouteState, state_key
from rerankq.worker.backlog import measure
from rerankq.worker.stats import WorkerStats, workers_key
from rerankq.worker.watchdog import recent_changes
from tests.conftest import StartWatchdog, StartWorker, eventually, new_queue
from tests.faults.jobs import left_to_come_back, scored_once

pytestmark = pytest.mark.integration

HIGH_WAIT_S, LOW_WAIT_S = 1.0, 0.3
#: A GPU that takes 50 ms per chunk of one job: 20 jobs/s.
SLOW_GPU = ("--ranker", "simulated", "--model", "latency_ms=50,token_us=0")
QUERY, DOCS = "sourdough starter", ["a sourdough starter is flour and water", "a river bank", "bread"]


class Stack:
    """One deployment: its own GPU and CPU queues, workers, a watchdog, and a router for its producers."""

    def __init__(self, celery_app: Any, start_worker: StartWorker, start_watchdog: StartWatchdog) -> None:
        self.gpu, self.cpu = new_queue(), new_queue()
        self.env = {"RERANKQ_GPU_QUEUE": self.gpu, "RERANKQ_CPU_QUEUE": self.cpu, "RERANKQ_POLL_MS": "100",
                    "RERANKQ_HIGH_WAIT_S": str(HIGH_WAIT_S), "RERANKQ_LOW_WAIT_S": str(LOW_WAIT_S),
                    "RERANKQ_ROUTE_TTL_S": "1.0"}
        self._start_worker, self._start_watchdog = start_worker, start_watchdog
        self.broker = BrokerRedis(celery_app)
        self.router = Router(lambda: self.broker, self.gpu, self.cpu, cache_s=0.05, passthrough=True)
        self.workers: list[WorkerProcess] = []
        self.sent: list[Any] = []
        self.started = time.time()

    def gpu_worker(self) -> None:
        self.workers.append(self._start_worker(*SLOW_GPU, queue=self.gpu, RERANKQ_MAX_CHUNK_JOBS="1", **self.env))

    def cpu_worker(self) -> None:
        self.workers.append(self._start_worker("--ranker", "fast", queue=self.cpu, **self.env))

    def watchdog(self) -> RerankqProcess:
        return self._start_watchdog(**self.env)

    def state(self) -> RouteState | None:
        raw = self.broker.client.get(state_key(self.broker, self.gpu))
        return RouteState.decode(raw) if raw else None

    def delay(self, n: int) -> list[Any]:
        handles = [rerank.delay(QUERY, DOCS) for _ in range(n)]
        self.sent += handles
        return handles

    def flood_gpu(self, n: int) -> None:
        self.sent += [rerank.apply_async((QUERY, DOCS), queue=self.gpu) for _ in range(n)]

    def rankers(self, handles: list[Any]) -> set[str]:
        return {Result.from_dict(h.get(timeout=60)).ranker for h in handles}

    def changes(self) -> list[dict[str, str]]:
        oldest_first = reversed(recent_changes(self.broker, self.gpu))
        return [c for c in oldest_first if float(c["at"]) >= self.started]

    def scored_once(self, what: str, handles: list[Any] | None = None) -> None:
        """Each job sent (or of ``handles``) scored once by the stack's workers, and no more a while later."""
        ids = [h.id for h in (self.sent if handles is None else handles)]
        scored_once(self.served, ids, lambda: left_to_come_back(self.broker, ids), 2, what)

    def served(self) -> int:
        """Jobs the stack's workers scored, from the figures they report."""
        total = 0
        for queue in (self.gpu, self.cpu):
            reports = self.broker.client.hgetall(workers_key(self.broker, queue)).values()
            total += sum(WorkerStats.decode(raw).served for raw in reports)
        return total


@pytest.fixture
def stack(celery_app: Any, start_worker: StartWorker, start_watchdog: StartWatchdog,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    stack = Stack(celery_app, start_worker, start_watchdog)
    monkeypatch.setattr(rerank, "router", stack.router)
    yield stack
    # Results never fetched unsubscribe when collected: let them, while this suite's Redis is up.
    stack.sent.clear()
    gc.collect()
    stack.broker.close()


def routed_to(stack: Stack, route: str, cpu_open: bool) -> Callable[[], bool]:
    def check() -> bool:
        state = stack.state()
        return state is not None and (state.route, state.cpu_open) == (route, cpu_open)
    return check


def test_a_backlog_sheds_new_jobs_to_the_fast_ranker_until_it_drains(stack: Stack) -> None:
    stack.gpu_worker()
    stack.cpu_worker()
    stack.watchdog()
    eventually(routed_to(stack, "gpu", True), 30, "both workers live, route gpu")
    assert stack.rankers(stack.delay(3)) == {"simulated"}  # the GPU worker measures its throughput

    stack.flood_gpu(60)  # 3 s of work for the slow GPU
    eventually(routed_to(stack, "shed", True), 5, "route shed")
    time.sleep(0.1)  # the router's cache
    assert stack.rankers(stack.delay(10)) == {"fast"}
    status = gather(stack.broker, Settings.from_env(stack.env))
    assert status["route"]["route"] == "shed" and status["routed"][stack.gpu] >= 3
    assert sorted(w["ranker"] for w in status["workers"]) == ["fast", "simulated"]
    gpu_row = next(w for w in status["workers"] if w["ranker"] == "simulated")
    assert 0 < gpu_row["busy_ratio"] <= 1 and gpu_row["wait_p95_ms"] > 0  # the write-up's two figures

    eventually(routed_to(stack, "gpu", True), 20, "route back to gpu once drained")
    time.sleep(0.1)
    assert stack.rankers(stack.delay(5)) == {"simulated"}

    changes = stack.changes()
    assert [c["route"] for c in changes if c["cpu_open"] == "1"][-2:] == ["shed", "gpu"]
    shed, back = changes[-2:]
    assert float(shed["gpu_wait_s"]) > HIGH_WAIT_S and float(back["gpu_wait_s"]) <= LOW_WAIT_S
    # Every job got its result above, and each was scored exactly once.
    stack.scored_once(f"{len(stack.sent)} jobs served once each")


def test_a_bulk_backlog_never_sheds_interactive_jobs_and_interactive_overload_still_does(stack: Stack) -> None:
    stack.gpu_worker()
    stack.cpu_worker()
    stack.watchdog()
    eventually(routed_to(stack, "gpu", True), 30, "both workers live, route gpu")
    assert stack.rankers(stack.delay(3)) == {"simulated"}

    # 6 s of work for the slow GPU, in its bulk lane: far over the marks if it counted.
    stack.sent += [rerank.apply_async((QUERY, DOCS), queue=stack.gpu, lane="bulk") for _ in range(120)]
    bulk_lane = lanes.queue_for(stack.gpu, lanes.BULK)

    def bulk_backlog() -> int:
        state = stack.state()
        return state.loads[bulk_lane].backlog if state is not None and bulk_lane in state.loads else 0

    eventually(lambda: bulk_backlog() > 100, 5, "the watchdog measures the bulk backlog")
    time.sleep(1.0)  # ten polls over it
    assert routed_to(stack, "gpu", True)() and "shed" not in [c["route"] for c in stack.changes()]
    assert stack.rankers(stack.delay(5)) == {"simulated"}  # served by the GPU worker, ahead of the bulk run
    assert bulk_backlog() > 0

    stack.flood_gpu(60)  # interactive traffic over capacity: 3 s of interactive work
    eventually(routed_to(stack, "shed", True), 5, "route shed on the interactive backlog")
    time.sleep(0.1)
    assert stack.rankers(stack.delay(5)) == {"fast"}
    stack.scored_once(f"{len(stack.sent)} jobs served once each")


def test_of_two_watchdogs_one_leads_and_the_other_takes_over_within_the_route_ttl_when_it_is_killed(
        stack: Stack) -> None:
    stack.gpu_worker()
    watchdogs = [stack.watchdog(), stack.watchdog()]
    eventually(lambda: (state := stack.state()) is not None and bool(state.leader), 30, "a leader")
    first = stack.state()
    assert first is not None
    leader = next(w for w in watchdogs if f"-{w.proc.pid}-" in first.leader)
    standby = next(w for w in watchdogs if w is not leader)
    eventually(lambda: "standing by" in standby.log(), 10, "the other stands by")

    leader.kill()
    killed, gaps = time.monotonic(), 0
    while (state := stack.state()) is None or state.leader == first.leader:
        gaps += state is None
        assert time.monotonic() - killed < 5, "no takeover"
        time.sleep(0.02)
    # The route TTL (1 s here) and a poll or two of a loaded machine; without a takeover it never moves.
    assert time.monotonic() - killed < 1.0 + 1.5
    assert gaps == 0  # producers never saw the route state missing
    assert f"-{standby.proc.pid}-" in state.leader and "leading" in standby.log()


def test_prefetched_unacked_jobs_count_in_the_backlog(stack: Stack, start_worker: StartWorker) -> None:
    worker = start_worker("--ranker", "simulated", "--model", "latency_ms=20,token_us=0", queue=stack.gpu,
                          RERANKQ_MAX_CHUNK_JOBS="1", RERANKQ_PREFETCH="1000", **stack.env)
    stack.flood_gpu(500)
    lists = stack.broker.queue_lists(stack.gpu)
    eventually(lambda: sum(stack.broker.client.llen(name) for name in lists) == 0, 20, "all 500 prefetched")
    eventually(lambda: measure(stack.broker, [stack.gpu], 0.1).loads[stack.gpu].held > 300, 10,
               "the worker reports what it holds")
    load = measure(stack.broker, [stack.gpu], 0.1).loads[stack.gpu]
    assert load.waiting == 0 and load.workers == 1
    assert load.held > 300 and load.backlog == load.held
    assert stack.rankers(stack.sent) == {"simulated"}
    assert len(stack.sent) == 500
    stack.scored_once("500 jobs served once each")
    assert worker.proc.poll() is None


def test_both_queues_full_gives_passthrough_at_once_and_a_dead_watchdog_falls_back_to_gpu(stack: Stack) -> None:
    stack.gpu_worker()  # and no CPU worker: the CPU queue is closed
    watchdog = stack.watchdog()
    eventually(routed_to(stack, "gpu", False), 30, "GPU worker live, CPU queue closed")
    assert stack.rankers(stack.delay(2)) == {"simulated"}

    stack.flood_gpu(60)
    eventually(routed_to(stack, "shed", False), 5, "route shed with the CPU queue closed")
    time.sleep(0.1)
    handles = stack.delay(5)
    assert all(h.ready() for h in handles)  # answered without a round trip to any worker
    results = [Result.from_dict(h.get(timeout=0.01)) for h in handles]
    assert {r.ranker for r in results} == {"passthrough"}
    assert results[0].scores == sorted(results[0].scores, reverse=True) and len(results[0].scores) == len(DOCS)

    watchdog.kill()
    eventually(lambda: stack.state() is None, 3, "the route state expired (1 s TTL)")
    time.sleep(0.1)
    assert stack.rankers(stack.delay(3)) == {"simulated"}
    queued = [h for h in stack.sent if h not in handles]
    stack.scored_once("every queued job served once", queued)
