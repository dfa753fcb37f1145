"""Soak: mixed load while one of two workers is SIGKILLed at random intervals and restarted by its
supervisor. Checks that every job gets exactly one outcome and that the surviving worker's memory stays flat;
prints the figures RELIABILITY.md quotes. The suite runs a short one (``SHORT_S``, a kill every 8-15 s); the
long one is ``RERANKQ_SOAK_S=600 pytest tests/faults/test_soak.py -s`` (a kill every 15-40 s)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rerankq.local import rss_mb
from rerankq.producer import submit_many
from rerankq.tasks import Result, rerank
from tests.conftest import StartWatchdog, eventually, new_queue

#: The suite's soak: a few kills, short enough for every CI run.
SHORT_S = 40.0
SOAK_S = float(os.environ.get("RERANKQ_SOAK_S") or SHORT_S)
#: Seconds between kills, drawn at random in this range: a short soak kills more often, to kill a few times
#: (the supervisor's pause before a restart doubles while kills come within a minute of starts).
KILL_EVERY_S = (8.0, 15.0) if SOAK_S <= SHORT_S else (15.0, 40.0)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(int(SOAK_S) + 600)]


def test_soak_with_random_worker_kills(celery_app: Any, redis_url: str, start_watchdog: StartWatchdog,
                                      tmp_path: Path) -> None:
    queue = new_queue()
    env = {**os.environ, "RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
           "RERANKQ_GPU_QUEUE": queue, "RERANKQ_POLL_MS": "200"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log = tmp_path / "workers.log"
    stop = threading.Event()
    with open(log, "wb") as sink:
        workers = subprocess.Popen([sys.executable, "-m", "rerankq", "worker", "--gpus", "0,1", "--ranker",
                                    "simulated", "--model", "latency_ms=20,token_us=20", "--queue", queue,
                                    "--metrics-port", "0"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    start_watchdog(**{k: env[k] for k in ("RERANKQ_GPU_QUEUE", "RERANKQ_POLL_MS")})
    try:
        eventually(lambda: len(re.findall(r"ready\.", log.read_text())) >= 2, 120, "both workers ready")
        pids = lambda: {int(g): int(p) for g, p in re.findall(r"worker cuda:(\d): pid (\d+)", log.read_text())}  # noqa: E731
        survivor = pids()[0]
        memory = [rss_mb(survivor)]
        bulk: dict[str, Any] = {}
        web: list[Any] = []
        rng = random.Random(7)

        words = ["bread", "flour", "yeast", "salt", "water"]

        def jobs() -> Iterator[dict[str, Any]]:
            while not stop.is_set():
                yield {"id": uuid.uuid4().hex, "query": "bread flour",
                       "docs": [" ".join(rng.choices(words, k=rng.randint(3, 60))) for _ in range(rng.randint(1, 30))]}

        def run_bulk() -> None:
            for job_id, outcome in submit_many(jobs(), max_in_flight=64, queue=queue):
                bulk[job_id] = bulk.get(job_id, 0) + 1 if isinstance(outcome, Result) else outcome

        def run_web() -> None:
            while not stop.is_set():
                web.append(rerank.apply_async(("bread", ["bread", "salt"]), queue=queue))
                time.sleep(0.05)

        threads = [threading.Thread(target=run_bulk, daemon=True), threading.Thread(target=run_web, daemon=True)]
        for thread in threads:
            thread.start()
        kills, started = 0, time.monotonic()
        while time.monotonic() - started < SOAK_S:
            time.sleep(rng.uniform(*KILL_EVERY_S))
            victim = pids()[1]
            os.kill(victim, signal.SIGKILL)
            kills += 1
            memory.append(rss_mb(survivor))
            # The supervisor restarts it after a pause that grows while kills come within a minute of starts.
            eventually(lambda: pids()[1] != victim, 90, "the killed worker restarted")  # noqa: B023
        stop.set()
        for thread in threads:
            thread.join(300)
        web_outcomes = [_outcome(celery_app, h) for h in web]
        memory.append(rss_mb(survivor))
    finally:
        stop.set()
        workers.send_signal(signal.SIGTERM)
        workers.wait(120)
    failures = [v for v in bulk.values() if v != 1]
    first, last = memory[1] if len(memory) > 2 else memory[0], memory[-1]
    print(f"\nsoak {SOAK_S:.0f}s: {len(bulk)} bulk jobs, {len(web_outcomes)} web jobs, {kills} worker kills; "
          f"bulk failures {len(failures)}; web failures {sum(isinstance(o, BaseException) for o in web_outcomes)}; "
          f"survivor RSS {memory[0]:.0f} MB at start, {first:.0f} MB after warm-up, {last:.0f} MB at end")
    assert not failures
    assert [o for o in web_outcomes if isinstance(o, BaseException)] == []
    assert last < first * 1.2 + 20


def _outcome(celery_app: Any, handle: Any) -> Any:
    """The job's outcome; for one that never came, what Redis still holds of it."""
    try:
        return handle.get(timeout=120, propagate=False)
    except Exception:
        stored = celery_app.backend.client.get(celery_app.backend.get_key_for_task(handle.id))
        return RuntimeError(f"no outcome for {handle.id}; result key {'holds a result' if stored else 'empty'}")
