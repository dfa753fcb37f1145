"""The watchdog's measurements and decisions against a real Redis: real job messages in the queue lists,
worker figures written the way workers write them, and the route producers read back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from rerankq.celeryconfig import Settings
from rerankq.tasks import TASK_NAME, rerank
from rerankq.tasks.connections import BrokerRedis
from rerankq.tasks.router import PASSTHROUGH, QueueLoad, Router, RouteState, counts_key, state_key
from rerankq.worker.backlog import measure
from rerankq.worker.stats import StatsReporter, WorkerStats
from rerankq.worker.watchdog import Watchdog, recent_changes
from tests.conftest import new_queue

pytestmark = pytest.mark.integration

POLL_S = 0.1


@dataclass
class Setup:
    broker: BrokerRedis
    settings: Settings
    router: Router

    @property
    def gpu(self) -> str:
        return self.settings.gpu_queue

    @property
    def cpu(self) -> str:
        return self.settings.cpu_queue

    def enqueue(self, n: int, queue: str) -> None:
        for _ in range(n):
            rerank.apply_async(("query", ["doc"] * 10), queue=queue)

    def report(self, queue: str, node: str, pairs_per_s: float = 100.0, held: int = 0) -> None:
        """Figures as a live worker reports them: 10 pairs per job, ``pairs_per_s`` while busy."""
        stats = WorkerStats(node=node, ranker="simulated", model="m", device="cpu", held={queue: held},
                            pairs=1000, jobs=100, busy_s=1000 / pairs_per_s, served=100)
        reporter = StatsReporter(self.broker, lambda: [queue], lambda: stats, interval_s=3600)
        reporter.report()


def lead(watchdog: Watchdog) -> RouteState:
    """A poll of a watchdog that leads (the only one on its queues)."""
    state = watchdog.poll()
    assert state is not None, "this watchdog stood by"
    return state


@pytest.fixture
def setup(celery_app: Any) -> Iterator[Setup]:
    broker = BrokerRedis(celery_app)
    settings = Settings.from_env({}).with_(gpu_queue=new_queue(), cpu_queue=new_queue(), poll_ms=POLL_S * 1000,
                                          high_wait_s=2.0, low_wait_s=0.5, route_ttl_s=1.0)
    yield Setup(broker, settings, Router(lambda: broker, settings.gpu_queue, settings.cpu_queue, 0.0, True))
    for queue in (settings.gpu_queue, settings.cpu_queue):
        broker.client.delete(*broker.queue_lists(queue))
    broker.close()


def test_one_poll_after_the_backlog_passes_the_high_mark_new_jobs_go_to_cpu(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-worker")  # 10 jobs/s
    setup.report(setup.cpu, "cpu-worker")
    watchdog = Watchdog(setup.broker, setup.settings)
    setup.enqueue(15, setup.gpu)
    assert lead(watchdog).route == "gpu"  # 1.5 s of wait: under the 2 s mark
    assert setup.router.route() == setup.gpu
    setup.enqueue(10, setup.gpu)
    state = lead(watchdog)
    assert state.route == "shed" and state.cpu_open
    assert state.loads[setup.gpu].wait_s == pytest.approx(2.5)
    assert setup.router.route() == setup.cpu


def test_jobs_held_by_workers_count_in_the_backlog(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-1", held=12)
    setup.report(setup.gpu, "gpu-2", held=13)
    setup.report(setup.cpu, "cpu-1")
    setup.enqueue(5, setup.gpu)
    load = measure(setup.broker, [setup.gpu], POLL_S).loads[setup.gpu]
    assert (load.waiting, load.held, load.backlog, load.workers) == (5, 25, 30, 2)
    assert load.wait_s == pytest.approx(30 * 10 / 200)
    state = lead(Watchdog(setup.broker, setup.settings))
    assert state.route == "gpu"  # 1.5 s: two workers share the backlog


def test_the_backlog_counts_every_priority_list_under_a_key_prefix(setup: Setup, redis_url: str) -> None:
    prefixed = Celery("prefixed", broker=redis_url, broker_transport_options={"global_keyprefix": "tenant:"})
    for priority in (0, 4, 9):
        prefixed.send_task(TASK_NAME, ("q", ["d"]), queue=setup.gpu, priority=priority)
    broker = BrokerRedis(prefixed)
    try:
        assert len(broker.queue_lists(setup.gpu)) > 1
        assert all(name.startswith("tenant:") for name in broker.queue_lists(setup.gpu))
        assert measure(broker, [setup.gpu], POLL_S).loads[setup.gpu].waiting == 3
        assert measure(setup.broker, [setup.gpu], POLL_S).loads[setup.gpu].waiting == 0
    finally:
        broker.client.delete(*broker.queue_lists(setup.gpu))
        broker.close()
        prefixed.close()


def test_a_worker_that_stops_reporting_is_no_longer_live(setup: Setup) -> None:
    setup.report(setup.gpu, "gone")
    assert measure(setup.broker, [setup.gpu], POLL_S).loads[setup.gpu].workers == 1
    time.sleep(2.1)  # live_for(0.1 s) is 2 s
    load = measure(setup.broker, [setup.gpu], POLL_S).loads[setup.gpu]
    assert load.workers == 0 and load.wait_s == float("inf")


def test_both_queues_over_their_marks_means_passthrough_unless_switched_off(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-worker")
    setup.enqueue(30, setup.gpu)  # no CPU worker is live: the CPU queue is closed
    state = lead(Watchdog(setup.broker, setup.settings))
    assert state.route == "shed" and not state.cpu_open
    assert setup.router.route() == PASSTHROUGH
    off = Router(lambda: setup.broker, setup.gpu, setup.cpu, 0.0, passthrough=False)
    assert off.route() == setup.gpu


def test_a_restarted_watchdog_carries_on_from_the_route_it_finds(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-worker")
    setup.report(setup.cpu, "cpu-worker")
    setup.enqueue(30, setup.gpu)
    first = Watchdog(setup.broker, setup.settings)
    assert lead(first).route == "shed"
    first.lease.release()  # stopped: a graceful stop hands the lease over at once
    setup.broker.client.delete(*setup.broker.queue_lists(setup.gpu))
    setup.enqueue(10, setup.gpu)  # 1 s: between the marks
    assert lead(Watchdog(setup.broker, setup.settings)).route == "shed"


def test_without_a_watchdog_the_route_state_expires_back_to_gpu(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-worker")
    setup.report(setup.cpu, "cpu-worker")
    setup.enqueue(30, setup.gpu)
    lead(Watchdog(setup.broker, setup.settings))
    assert setup.router.route() == setup.cpu
    ttl_ms = setup.broker.client.pttl(state_key(setup.broker, setup.gpu))
    assert 0 < ttl_ms <= 1000
    time.sleep(ttl_ms / 1000 + 0.05)
    assert setup.broker.client.get(state_key(setup.broker, setup.gpu)) is None
    assert setup.router.route() == setup.gpu


def test_of_two_watchdogs_with_diverged_hysteresis_one_leads_and_the_route_does_not_flap(setup: Setup) -> None:
    setup.report(setup.gpu, "gpu-worker")
    setup.report(setup.cpu, "cpu-worker")
    first, second = Watchdog(setup.broker, setup.settings), Watchdog(setup.broker, setup.settings)
    setup.enqueue(30, setup.gpu)  # 3 s: over the high mark
    assert lead(first).route == "shed"
    setup.broker.client.delete(*setup.broker.queue_lists(setup.gpu))
    setup.enqueue(10, setup.gpu)  # 1 s: between the marks, where each keeps the route it last decided
    # The second saw no backlog when it last decided: alone, it would turn the route back to gpu here.
    second.states = {setup.gpu: RouteState(route="gpu", cpu_open=True, since=0.0, at=0.0)}
    for _ in range(5):
        assert second.poll() is None  # standing by
        state = lead(first)
    assert state.route == "shed" and state.leader == first.lease.holder
    assert [c["route"] for c in recent_changes(setup.broker, setup.gpu)] == ["shed"]  # one change, no flapping
    first.lease.release()
    assert lead(second).route == "shed"  # takes over from the state the leader left


def test_the_route_state_round_trips_through_json() -> None:
    load = QueueLoad("q", waiting=3, held=4, workers=1, pairs_per_s=10.5, pairs_per_job=None)
    state = RouteState(route="shed", cpu_open=False, since=1.0, at=2.0, reason="r", loads={"q": load})
    assert RouteState.decode(state.encode()) == state


def test_passthrough_is_logged_and_counted(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.report(setup.gpu, "gpu-worker")
    setup.enqueue(30, setup.gpu)
    lead(Watchdog(setup.broker, setup.settings))
    with caplog.at_level("WARNING", logger="rerankq.tasks.router"):
        assert [setup.router.route() for _ in range(3)] == [PASSTHROUGH] * 3
    assert "passthrough" in caplog.text and setup.gpu in caplog.text
    setup.router.route()  # the next refresh adds the counts to Redis
    routed = setup.broker.client.hgetall(counts_key(setup.broker, setup.gpu))
    assert int(routed[PASSTHROUGH.encode()]) >= 3


def test_each_model_is_judged_apart_and_sheds_alone(setup: Setup) -> None:
    """Two models: ``beta``'s backlog sheds its new jobs (to the fast ranker, or to passthrough for a model
    without one) while ``alpha``'s idle queue keeps its cross-encoder."""
    beta, gamma, patient = new_queue(), new_queue(), new_queue()
    spec = [{"name": "alpha", "queue": setup.gpu}, {"name": "beta", "queue": beta},
            {"name": "gamma", "queue": gamma, "fallback": None},
            {"name": "patient", "queue": patient, "high_wait_s": 5.0, "low_wait_s": 1.0}]
    settings = setup.settings.with_(models=json.dumps(spec))
    for queue, node in ((setup.gpu, "alpha-worker"), (beta, "beta-worker"), (gamma, "gamma-worker"),
                        (patient, "patient-worker"), (setup.cpu, "cpu-worker")):
        setup.report(queue, node)
    watchdog = Watchdog(setup.broker, settings)
    for queue in (beta, gamma, patient):
        setup.enqueue(30, queue)  # 3 s: over the deployment's high mark (2 s), not over patient's own (5 s)
    assert lead(watchdog).route == "gpu"  # the default model's state
    states = {name: watchdog.states[queue] for name, queue in (("alpha", setup.gpu), ("beta", beta), ("gamma", gamma),
                                                                ("patient", patient))}
    assert {name: (s.route, s.cpu_open) for name, s in states.items()} == {
        "alpha": ("gpu", True), "beta": ("shed", True), "gamma": ("shed", False), "patient": ("gpu", True)}
    routers = {name: Router(lambda: setup.broker, m.queue, m.fallback, 0.0, True)
               for name, m in zip("abgp", settings.served, strict=True)}
    assert (routers["a"].route(), routers["b"].route(), routers["g"].route()) == (setup.gpu, setup.cpu, PASSTHROUGH)
    assert [c["route"] for c in recent_changes(setup.broker, beta)] == ["shed"]
    assert recent_changes(setup.broker, setup.gpu) == []
    assert "no fast-ranker fallback" in states["gamma"].reason
    # Another watchdog takes over from each model's own state.
    watchdog.lease.release()
    again = Watchdog(setup.broker, settings)
    lead(again)
    assert again.states[beta].route == "shed" and again.states[beta].since == states["beta"].since
    for queue in (beta, gamma, patient):
        setup.broker.client.delete(*setup.broker.queue_lists(queue))
