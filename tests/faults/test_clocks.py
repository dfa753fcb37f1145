"""Hosts whose clocks disagree: a watchdog and a worker run under Debian's ``datefudge``, 5 s either side of
the real clock (and of the producer's, this test's). (Debian's ``faketime`` 0.9.10 cannot run these processes:
with the monotonic clock left alone Python's ``time.sleep`` fails with EINVAL, and with it shifted every timed
wait of a thread lasts the shift longer.)

Before one clock (``tasks/clock.py``): the watchdog saw no live worker (its figures 10 s old), so every job got
passthrough; a job held past the reclaim grace was reclaimed from its live worker and scored twice; a worker
ahead of the producer failed short-deadline jobs at once with ``DeadlineExceeded``.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.producer import rerank
from tests.conftest import eventually, new_queue, rerankq

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shutil.which("datefudge"), reason="Debian's datefudge is not installed "
                                 "(`apt-get install datefudge`; .ci/run installs it)")]

#: A slow simulated GPU: 5 ms a padded token, so a job of 40 long docs is held for well over the 10 s grace.
MODEL = "latency_ms=1,token_us=5000"
LONG_DOCS = [" ".join(f"w{i}x{j}" for j in range(60)) for i in range(40)]


def shifted(seconds: float) -> list[str]:
    """Run a command with its wall clock ``seconds`` off (from then on it runs at the normal rate); the
    monotonic clock, which Celery's timers use and every host keeps its own, is left alone."""
    start = datetime.datetime.fromtimestamp(time.time() + seconds, datetime.timezone.utc)
    return ["datefudge", start.strftime("%Y-%m-%d %H:%M:%S.%f UTC")]


def _logged_at(log: str, containing: str, first: bool = False) -> float:
    """When (by its own clock) a process wrote its last (or first) log line containing ``containing``."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\].*" + re.escape(containing), log, re.M)
    assert stamps, log[-2000:]
    stamp = stamps[0] if first else stamps[-1]
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged


def _status(env: dict[str, str]) -> dict[str, Any]:
    done = rerankq("status", "--json", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize(("watchdog_at", "worker_at"), [(5.0, -5.0), (-5.0, 5.0)])
def test_routing_reclaim_and_deadlines_hold_with_the_hosts_clocks_10s_apart(
        celery_app: Any, redis_url: str, tmp_path: Path, watchdog_at: float, worker_at: float) -> None:
    queue, cpu = new_queue(), new_queue()
    env = {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_GPU_QUEUE": queue, "RERANKQ_CPU_QUEUE": cpu,
           # Marks no load here reaches: only a worker taken for dead (an infinite wait) sheds.
           "RERANKQ_HIGH_WAIT_S": "1000", "RERANKQ_LOW_WAIT_S": "500", "RERANKQ_HIGH_JOBS": "10000",
           "RERANKQ_LOW_JOBS": "5000"}
    worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", MODEL], env, tmp_path / "worker.log",
                           f"clock.{queue}@h", prefix=shifted(worker_at))
    watchdog: RerankqProcess | None = None
    try:
        worker.wait_ready(celery_app)
        assert abs(_logged_at(worker.log(), " ready.") - time.time() - worker_at) < 3  # its clock is shifted
        launched = time.time()
        watchdog = RerankqProcess(["watchdog"], env, tmp_path / "watchdog.log", prefix=shifted(watchdog_at))
        # Liveness: this host (the real clock) and the watchdog both see the worker live, and nothing sheds.
        eventually(lambda: (lambda s: s["route"]["watchdog"] and worker.node in {w["node"] for w in s["workers"]})(
            _status(env)), 30, "status shows the watchdog's route and the worker live")
        time.sleep(3)  # several polls of the watchdog
        # Its first line, written as it starts (within a few seconds of launch), by its shifted clock.
        assert watchdog_at - 0.5 < _logged_at(watchdog.log(), "", first=True) - launched < watchdog_at + 4
        assert _status(env)["route"]["route"] == "gpu", watchdog.log()[-2000:]
        assert "-> shed" not in watchdog.log(), watchdog.log()[-2000:]

        # Deadlines: a 5 s job is scored, whichever side of the producer's clock the worker's is.
        quick = rerank("bread", ["bread and flour", "stone"], timeout=5, queue=queue)
        assert quick.ranker == "simulated", quick

        # Reclaim: a job its live worker holds for longer than the grace is never taken from it.
        held = rerank("bread", LONG_DOCS, timeout=120, queue=queue)
        assert held.ranker == "simulated" and held.timings.inference_ms > 12_000, held.timings
        served = {w["node"]: w["served"] for w in _status(env)["workers"]}
        assert served[worker.node] == 2, served  # each job scored once
        assert "put back" not in watchdog.log(), watchdog.log()[-2000:]
    finally:
        if watchdog is not None:
            watchdog.stop()
        worker.stop()
