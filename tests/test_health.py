"""The health verdict ``rerankq serve`` gives from what Redis holds: pure logic."""

from __future__ import annotations

from rerankq.celeryconfig import Settings
from rerankq.server.health import judge
from rerankq.tasks.router import GPU, SHED, RouteState

GPU_Q, CPU_Q = "rerank.gpu", "rerank.cpu"
SETTINGS = Settings(gpu_queue=GPU_Q, cpu_queue=CPU_Q)


def state(route: str, cpu_open: bool = True) -> RouteState:
    return RouteState(route, cpu_open=cpu_open, since=0.0, at=0.0)


def test_ok_with_a_live_worker_on_the_gpu_queue_with_or_without_a_watchdog() -> None:
    for route in (None, state(GPU)):
        health = judge(route, {GPU_Q: 2, CPU_Q: 0}, SETTINGS)
        assert health.status == "ok" and "2 live worker(s) on rerank.gpu" in health.reason


def test_unavailable_when_no_live_worker_serves_the_gpu_queue() -> None:
    health = judge(None, {GPU_Q: 0, CPU_Q: 3}, SETTINGS)
    assert health.status == "unavailable" and "no live worker serves rerank.gpu" in health.reason


def test_degraded_while_shedding_to_a_served_cpu_queue_unavailable_if_nobody_serves_it() -> None:
    assert judge(state(SHED), {GPU_Q: 0, CPU_Q: 1}, SETTINGS).status == "degraded"
    lost = judge(state(SHED), {GPU_Q: 1, CPU_Q: 0}, SETTINGS)
    assert lost.status == "unavailable" and "shedding to rerank.cpu, which no live worker serves" in lost.reason


def test_degraded_while_passing_through_an_overload_unavailable_when_no_worker_is_left() -> None:
    health = judge(state(SHED, cpu_open=False), {GPU_Q: 2, CPU_Q: 0}, SETTINGS)
    assert health.status == "degraded" and "passthrough" in health.reason and health.route == SHED
    gone = judge(state(SHED, cpu_open=False), {GPU_Q: 0, CPU_Q: 0}, SETTINGS)
    assert gone.status == "unavailable" and "no live worker serves rerank.gpu or rerank.cpu" in gone.reason


def test_without_passthrough_a_closed_cpu_queue_sends_jobs_to_the_gpu_queue_so_its_workers_decide() -> None:
    off = SETTINGS.with_(passthrough=False)
    assert judge(state(SHED, cpu_open=False), {GPU_Q: 1, CPU_Q: 0}, off).status == "ok"
    assert judge(state(SHED, cpu_open=False), {GPU_Q: 0, CPU_Q: 0}, off).status == "unavailable"


def test_the_reject_mode_says_it_answers_429_while_shedding() -> None:
    reject = SETTINGS.with_(serve_overload="reject")
    health = judge(state(SHED), {GPU_Q: 1, CPU_Q: 1}, reject)
    assert health.status == "degraded" and "answering 429" in health.reason
    # Shed because no worker is left: every request would get 429, so it is not healthy.
    assert judge(state(SHED), {GPU_Q: 0, CPU_Q: 1}, reject).status == "unavailable"


def test_a_full_redis_is_unavailable_whatever_the_workers() -> None:
    from rerankq.tasks.memory import Memory

    full = Memory(used=101 * 2**20, limit=100 * 2**20, policy="noeviction")
    health = judge(None, {GPU_Q: 2, CPU_Q: 1}, SETTINGS, full)
    assert health.status == "unavailable" and "Redis is full" in health.reason and "maxmemory" in health.reason
