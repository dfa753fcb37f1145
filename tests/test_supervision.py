"""Process supervision: `rerankq worker --gpus` (one pinned worker per GPU, restarted when it dies) and
`rerankq up` (the whole stack), stopped by SIGTERM or Ctrl-C, or killed, with no process left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from rerankq.redis_server import free_port
from rerankq.tasks import Result, rerank
from tests.conftest import eventually, new_queue

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie is gone too


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """``launch(*args, **env)``: ``rerankq <args>`` with its output in a file; killed (group) if left running."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / f"{uuid.uuid4().hex[:6]}.out"
        inherited = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        with open(out, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "rerankq", *args], stdout=sink, stderr=subprocess.STDOUT,
                                    env={**inherited, **env}, start_new_session=True)
        started.append(proc)
        return proc, out

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_line(out: Path, pattern: str, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, out.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout}s in:\n{out.read_text(errors='replace')}")


def test_gpus_all_on_a_machine_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "-m", "rerankq", "worker", "--gpus", "all"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--gpus all: torch" in done.stderr and "sees no GPU" in done.stderr


def test_one_pinned_worker_per_gpu_and_a_killed_one_comes_back(celery_app: Any, redis_url: str, launch: Any) -> None:
    queue, name = new_queue(), f"gpus-{uuid.uuid4().hex[:6]}@localhost"
    # The simulated ranker stands in for a model, so --device cuda:N runs on any machine.
    supervisor, out = launch("worker", "--gpus", "0,1", "--ranker", "simulated", "--queue", queue, "--hostname",
                             name, "--metrics-port", "0", RERANKQ_BROKER_URL=redis_url)
    nodes = [f"cuda0.{name}", f"cuda1.{name}"]
    first = {gpu: int(wait_for_line(out, rf"worker cuda:{gpu}: pid (\d+)")[1]) for gpu in (0, 1)}

    def answering() -> bool:
        replies = celery_app.control.ping(destination=nodes, timeout=0.5)
        return sorted(n for reply in replies for n in reply) == nodes
    eventually(answering, 120, "both workers answer")
    stats = celery_app.control.inspect(destination=nodes, timeout=5).stats()
    assert {stats[f"cuda{g}.{name}"]["rerankq"]["device"] for g in (0, 1)} == {"cuda:0", "cuda:1"}
    handles = [rerank.apply_async(("q", ["q d"]), queue=queue) for _ in range(4)]
    assert {Result.from_dict(h.get(timeout=60)).ranker for h in handles} == {"simulated"}

    os.kill(first[0], signal.SIGKILL)
    wait_for_line(out, r"worker cuda:0 exited with -9; restarting in \d+s")
    eventually(lambda: not alive(first[0]), 10, "the killed worker reaped")
    eventually(answering, 120, "the restarted worker answers")
    assert rerank.apply_async(("q", ["q d"]), queue=queue).get(timeout=60)

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(90) == 0
    pids = [int(p) for p in re.findall(r"pid (\d+)", out.read_text())]
    assert len(pids) == 3 and "(restarted)" in out.read_text()  # two at the start, one restart
    assert not any(alive(pid) for pid in pids)


def _flower_status(port: int, auth: tuple[str, str]) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/workers", auth=auth, timeout=5).status_code
    except httpx.TransportError:
        return 0


def _commands(pids: Any) -> list[str]:
    """What each process is running, for a failure's message."""
    found = []
    for pid in pids:
        try:
            found.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()[:120]}")
        except OSError:
            found.append(f"{pid}: gone")
    return found


def stack_pids(out: Path) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", out.read_text())]


@pytest.fixture
def start_up(launch: Any, tiny_model: Path, tmp_path: Path) -> Callable[..., tuple[subprocess.Popen[bytes], Path, int]]:
    def start(**env: str) -> tuple[subprocess.Popen[bytes], Path, int]:
        flower_port = free_port()
        proc, out = launch("up", "--model", str(tiny_model), "--cpu", "--flower-port", str(flower_port),
                           "--serve-port", str(free_port()), "--metrics-port", "0", "--log-dir",
                           str(tmp_path / "logs"), **env)
        wait_for_line(out, "rerankq up: running")
        return proc, out, flower_port
    return start


@pytest.fixture
def up(start_up: Callable[..., tuple[subprocess.Popen[bytes], Path, int]]) -> tuple[subprocess.Popen[bytes], Path, int]:
    return start_up()


def stack_env(out: Path) -> dict[str, str]:
    """The stack's Redis URLs, from the file ``rerankq up`` names (the terminal shows them masked)."""
    path = wait_for_line(out, r"set -a; \. (\S+); set \+a")[1]
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines())


def test_up_serves_jobs_shows_them_in_flower_and_ctrl_c_stops_every_process(
        up: tuple[subprocess.Popen[bytes], Path, int], tmp_path: Path) -> None:
    proc, out, flower_port = up
    text = out.read_text()
    redis_url = stack_env(out)["RERANKQ_BROKER_URL"]
    assert redis_url.split("@")[0].split(":")[-1] not in text  # its password is not shown
    assert redis_url.split("@")[1] in re.search(r"^redis +(\S+)", text, re.M)[1]  # type: ignore[index]
    auth = re.search(r"user:password ([^:]+):(\S+)\)", text)
    assert auth and len(stack_pids(out)) == 6  # redis, CPU worker, fast worker, watchdog, API, Flower
    api = re.search(r"^api .* (http://\S+/v1/rerank)", text, re.M)[1]  # type: ignore[index]

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": i, "query": "bread", "docs": ["flour", "yeast"]}) + "\n"
                            for i in range(3)))
    submitted = subprocess.run([sys.executable, "-m", "rerankq", "submit", str(jobs), "-o", str(tmp_path / "out")],
                               env={**os.environ, "RERANKQ_BROKER_URL": redis_url}, capture_output=True, text=True,
                               timeout=180)
    assert submitted.returncode == 0, submitted.stderr + out.read_text()
    results = [json.loads(line) for line in (tmp_path / "out").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == [0, 1, 2] and {r["ranker"] for r in results} == {"cross-encoder"}

    def api_answers() -> bool:
        try:
            answer = httpx.post(api, json={"query": "bread", "documents": ["flour", "yeast"]}, timeout=30)
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and answer.json()["meta"]["ranker"] == "cross-encoder"
    eventually(api_answers, 60, "the API answers from the worker")

    def flower_shows_them() -> bool:
        try:
            tasks = httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", auth=(auth[1], auth[2]), timeout=5)
        except httpx.TransportError:
            return False
        return tasks.status_code == 200 and len(tasks.json()) >= 3
    eventually(flower_shows_them, 60, "Flower lists the jobs")

    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    assert "rerankq up: stopping" in out.read_text()
    assert not [pid for pid in stack_pids(out) if alive(pid)]


def test_a_killed_up_takes_its_processes_with_it_and_its_redis_wants_a_password(
        start_up: Callable[..., tuple[subprocess.Popen[bytes], Path, int]]) -> None:
    """With the user's own FLOWER_BASIC_AUTH (as the README says to set), which 2c4db98's ``up`` died on."""
    proc, out, flower_port = start_up(FLOWER_BASIC_AUTH="ops:their-own-secret")
    assert "user:password from your FLOWER_BASIC_AUTH" in out.read_text()
    eventually(lambda: _flower_status(flower_port, ("ops", "their-own-secret")) == 200, 60, "Flower with their auth")
    url = stack_env(out)["RERANKQ_BROKER_URL"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url("redis://" + url.split("@", 1)[1]).ping()  # no password: refused
    assert redis.Redis.from_url(url).ping()
    proc.kill()
    proc.wait()
    try:
        eventually(lambda: not [pid for pid in stack_pids(out) if alive(pid)], 60, "every child gone")
    except AssertionError:
        raise AssertionError(f"alive 60 s after up was killed: {_commands(p for p in stack_pids(out) if alive(p))}"
                             ) from None
