"""Flower on rerankq's app: each job is a task with its state, runtime and worker (over Flower's HTTP API,
and on its tasks page in headless Chromium where Debian's `chromium` is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import free_port
from rerankq.tasks import rerank
from tests.conftest import StartWorker, answering, eventually

pytestmark = pytest.mark.integration

AUTH = ("ops", "s3cret-for-tests")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker(start_worker: StartWorker, tiny_model: Path) -> WorkerProcess:
    return start_worker("--model", str(tiny_model))


@pytest.fixture(scope="module")
def flower(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = RerankqProcess(["flower", "--port", str(port), "--address", "127.0.0.1"],
                             {"RERANKQ_BROKER_URL": redis_url, "FLOWER_BASIC_AUTH": ":".join(AUTH)},
                             tmp_path_factory.mktemp("flower") / "flower.log")
    yield answering(f"http://127.0.0.1:{port}", process)
    process.stop()


def test_flower_asks_for_the_password(flower: str) -> None:
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401


def test_each_job_shows_in_flower_as_a_successful_task_with_its_runtime_and_worker(
        flower: str, worker: WorkerProcess) -> None:
    handles = [rerank.apply_async((f"query {i}", ["a doc", "another doc"]), queue=worker.queue) for i in range(5)]
    for handle in handles:
        handle.get(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        shown = {h.id: tasks.get(h.id, {}) for h in handles}
        if all(t.get("state") == "SUCCESS" for t in shown.values()):
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    for task in shown.values():
        assert task["name"] == "rerankq.rerank" and task["worker"] == worker.node
        assert task["runtime"] > 0 and task["result"] == "2 scores"


def test_a_worker_shows_its_queue_ranker_model_and_device(flower: str, worker: WorkerProcess,
                                                          tiny_model: Path) -> None:
    workers = httpx.get(f"{flower}/api/workers", params={"refresh": 1}, auth=AUTH, timeout=30).json()
    info = workers[worker.node]
    assert sorted(q["name"] for q in info["active_queues"]) == [worker.queue, f"{worker.queue}.bulk"]
    assert info["stats"]["rerankq"] == {"ranker": "cross-encoder", "model": str(tiny_model), "device": "cpu",
                                        "dtype": "fp32"}


def test_flower_will_not_start_without_a_password(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    done = subprocess.run([sys.executable, "-m", "rerankq", "flower"], capture_output=True, text=True, timeout=60,
                          env={**env, "RERANKQ_BROKER_URL": redis_url})
    assert done.returncode == 2 and "set FLOWER_BASIC_AUTH=user:password" in done.stderr


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium package is not installed")
def test_the_tasks_page_shows_the_jobs_in_headless_chromium(flower: str, worker: WorkerProcess,
                                                            tmp_path: Path) -> None:
    handles = [rerank.apply_async((f"screenshot {i}", ["a doc"]), queue=worker.queue) for i in range(3)]
    for handle in handles:
        handle.get(timeout=60)

    def listed() -> bool:  # Flower has the jobs' events: the page can show them
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        return all(handle.id in tasks for handle in handles)

    eventually(listed, 30, "Flower lists the jobs")
    user, password = AUTH
    page = flower.replace("http://", f"http://{user}:{password}@") + "/tasks"
    chromium = [str(shutil.which("chromium")), "--headless", "--no-sandbox", "--disable-gpu",
                "--virtual-time-budget=5000"]
    dom = subprocess.run([*chromium, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    for handle in handles:
        assert handle.id in dom.stdout, dom.stderr[-2000:]
    shot = Path(os.environ.get("RERANKQ_SCREENSHOT_DIR", tmp_path)) / "flower-tasks.png"
    taken = subprocess.run([*chromium, "--window-size=1400,900", f"--screenshot={shot}", page],
                           capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
