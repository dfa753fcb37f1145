"""Redis restarted mid-run (append-only file on): the worker, the watchdog and the bulk runner reconnect,
and the run completes with every job exactly once."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import RedisServer
from tests.conftest import eventually, new_queue

pytestmark = pytest.mark.integration

JOBS = 400


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_redis_restart_mid_run_loses_no_job(tmp_path: Path) -> None:
    queue = new_queue()
    with RedisServer(appendonly=True) as server:
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url, "RERANKQ_POLL_MS": "100",
               "RERANKQ_GPU_QUEUE": queue}
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=20,token_us=0"], env,
                               tmp_path / "worker.log", f"restart.{queue}@localhost")
        watchdog = RerankqProcess(["watchdog"], env, tmp_path / "watchdog.log")
        try:
            _run_through_a_restart(server, worker, watchdog, env, tmp_path)
        finally:
            worker.stop()
            watchdog.stop()


def _run_through_a_restart(server: RedisServer, worker: WorkerProcess, watchdog: RerankqProcess,
                           env: dict[str, str], tmp_path: Path) -> None:
    eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
    source, output = tmp_path / "jobs.jsonl", tmp_path / "scores.jsonl"
    source.write_text("".join(json.dumps({"id": i, "query": "bread", "docs": ["bread", "flour"]}) + "\n"
                              for i in range(JOBS)))
    run = subprocess.Popen([sys.executable, "-m", "rerankq", "submit", str(source), "-o", str(output),
                            "--max-in-flight", "32", "--no-progress"], env={**os.environ, **env},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: len(lines(output)) >= 60, 60, "the run is under way")
        server.restart(down_s=2)
        try:
            _, err = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            run.kill()
            _, err = run.communicate()
            raise AssertionError(f"the run hung: {len(lines(output))} of {JOBS} written\n{err[-3000:]}\n"
                                 f"worker:\n{worker.log()[-5000:]}\nwatchdog:\n{watchdog.log()[-2000:]}") from None
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err + worker.log()[-3000:]
    ids = [json.loads(line)["id"] for line in lines(output)]
    assert sorted(ids) == list(range(JOBS))
    assert worker.proc.poll() is None and watchdog.proc.poll() is None
    eventually(lambda: "Redis is reachable again" in watchdog.log(), 10, "the watchdog reconnected")



AWAITER = """
import asyncio, sys
from rerankq.producer import arerank

async def main():
    pending = [asyncio.create_task(arerank("bread", ["bread", "flour"], timeout=60, queue=sys.argv[1]))
               for _ in range(20)]
    await asyncio.sleep(0.5)
    print("pending", flush=True)
    results = await asyncio.gather(*pending)
    print("done", len(results), sorted({r.ranker for r in results}), flush=True)

asyncio.run(main())
"""


def test_awaited_results_survive_a_redis_restart(tmp_path: Path) -> None:
    queue = new_queue()
    with RedisServer(appendonly=True) as server:
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        # One chunk of 7 s: the jobs are held while Redis restarts under them.
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=7000,token_us=0"], env,
                               tmp_path / "worker.log", f"await.{queue}@localhost")
        awaiter = None
        try:
            eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
            awaiter = subprocess.Popen([sys.executable, "-c", AWAITER, queue], env={**os.environ, **env},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert awaiter.stdout is not None and awaiter.stdout.readline().strip() == "pending"
            server.restart(down_s=5)  # longer than redis-py's own reconnect retries last
            out, err = awaiter.communicate(timeout=120)
            assert awaiter.returncode == 0, err[-3000:] + worker.log()[-3000:]
            assert out.strip() == "done 20 ['simulated']"
        finally:
            if awaiter is not None and awaiter.poll() is None:
                awaiter.kill()
            worker.stop()


def line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line ``proc`` prints, or an AssertionError if none comes within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout}s"
    return proc.stdout.readline()


HUNG_AWAITER = """
import asyncio, sys, time
from rerankq.producer import arerank
from rerankq.tasks import RerankTimeout

async def main():
    queue = sys.argv[1]
    print("warm", (await arerank("bread", ["bread"], timeout=30, queue=queue)).ranker, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # Redis is stopped now
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    outcomes = await asyncio.gather(*(arerank("bread", ["bread"], timeout=1.0, queue=queue) for _ in range(5)),
                                    return_exceptions=True)
    print("hung", sum(isinstance(o, RerankTimeout) for o in outcomes), round(time.monotonic() - started, 1), ticks,
          flush=True)
    ticker.cancel()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # Redis runs again
    print("after", (await arerank("bread", ["bread"], timeout=30, queue=queue)).ranker, flush=True)

asyncio.run(main())
"""


def test_a_hung_redis_never_blocks_the_event_loop_and_each_await_times_out_on_time(tmp_path: Path) -> None:
    queue = new_queue()
    with RedisServer() as server:
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=1,token_us=0"], env,
                               tmp_path / "worker.log", f"hung.{queue}@localhost")
        awaiter = None
        assert server.pid is not None
        try:
            eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
            awaiter = subprocess.Popen([sys.executable, "-c", HUNG_AWAITER, queue], env={**os.environ, **env},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            assert awaiter.stdin is not None and awaiter.stdout is not None
            assert line(awaiter, 60).split() == ["warm", "simulated"]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                awaiter.stdin.write("\n")
                awaiter.stdin.flush()
                hung = line(awaiter, 20).split()
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert hung[:2] == ["hung", "5"], hung  # every call raised RerankTimeout...
            assert float(hung[2]) < 2.5  # ...at its 1 s timeout, not when Redis came back
            assert int(hung[3]) >= 10  # and the loop kept running meanwhile
            awaiter.stdin.write("\n")
            awaiter.stdin.flush()
            out, err = awaiter.communicate(timeout=60)
            assert out.split() == ["after", "simulated"], err[-3000:]
        finally:
            if awaiter is not None and awaiter.poll() is None:
                awaiter.kill()
            worker.stop()
