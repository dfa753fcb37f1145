"""The systems under test, started as real processes, and the clocks that time them.

Every Celery-based system (rerankq, naive Celery, celery-batches) publishes each result on its
``celery-task-meta-<id>`` channel; one pattern subscription timestamps them all as they arrive, so sending
never waits on a result. infinity-emb is timed per HTTP request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from bench.workload import Request
from rerankq.local import rss_mb
from rerankq.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


class Completions:
    """When each task's result was published (``time.perf_counter``)."""

    def __init__(self, url: str) -> None:
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("celery-task-meta-*")
        self._done: dict[str, float] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        try:
            for message in self._pubsub.listen():
                now = time.perf_counter()
                task_id = message["channel"].decode().removeprefix("celery-task-meta-")
                with self._cond:
                    self._done[task_id] = now
                    self._cond.notify_all()
        except redis.ConnectionError:  # the run's Redis stopped
            return

    def mark(self, task_id: str) -> None:
        with self._cond:
            self._done[task_id] = time.perf_counter()
            self._cond.notify_all()

    def wait(self, ids: list[str], timeout: float = 1800) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(i in self._done for i in ids):
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    missing = sum(i not in self._done for i in ids)
                    raise TimeoutError(f"{missing} of {len(ids)} results never came")
            return {i: self._done.pop(i) for i in ids}


class RoutedSender:
    """Sends requests as web apps do, through the router (``rerank.apply_async``), and records each job:
    a passthrough answer is marked done at once, as nothing is published for it."""

    def __init__(self, completions: Completions) -> None:
        self._completions = completions
        #: Task id -> the passthrough result, or None for a queued job (its result is read from Redis).
        self.sent: dict[str, dict[str, Any] | None] = {}

    def send(self, request: Any) -> str:
        from celery.result import EagerResult

        from rerankq.tasks import rerank

        handle = rerank.apply_async((request.query, request.docs))
        self.sent[handle.id] = None
        if isinstance(handle, EagerResult):
            self.sent[handle.id] = handle.result
            self._completions.mark(handle.id)
        return str(handle.id)

    def rankers(self) -> list[str]:
        """Which ranker served each job sent, in order; then forgets them."""
        from rerankq.tasks import app
        from rerankq.tasks.records import Result

        rankers = [Result.from_dict(result or app.backend.get_task_meta(task_id)["result"]).ranker
                   for task_id, result in self.sent.items()]
        self.sent.clear()
        return rankers


class System:
    """Something that takes a request and, some time later, marks it done in ``completions``."""

    def __init__(self, name: str, send: Callable[[Request], str], pids: Callable[[], list[int]],
                 stop: Callable[[], None]) -> None:
        self.name, self.send, self.pids, self.stop = name, send, pids, stop
        #: Requests that got no good answer (HTTP systems): a run with any is no result.
        self.failures: list[str] = []

    def check(self) -> None:
        if self.failures:
            raise RuntimeError(f"{self.name}: {len(self.failures)} requests got no good answer, e.g. "
                               f"{self.failures[0]}; no figure is reported")

    def signal(self, signum: int) -> None:
        for pid in self.pids():
            os.kill(pid, signum)

    def rss_mb(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids())


def checkout(ref: str, into: Path) -> dict[str, str]:
    """The code of git commit ``ref``, extracted into ``into``; returns the environment in which a process
    runs that build of rerankq (for before/after figures side by side in one run). ``PYTHONSAFEPATH``
    (Python 3.11+): ``python -m rerankq`` would otherwise put its working directory, this checkout, first
    on ``sys.path``, ahead of ``PYTHONPATH``, and run this build under the baseline's name."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return {"PYTHONPATH": str(into), "PYTHONSAFEPATH": "1"}


def worker_command(model: str, worker_args: tuple[str, ...]) -> list[str]:
    """``rerankq worker``'s arguments: a simulated ranker's own ``--model`` (its timings) replaces the weights' path,
    as a worker takes one ``--model`` per model served."""
    weights = [] if "--model" in worker_args else ["--model", model]
    return [*weights, "--loglevel", "WARNING", *worker_args]


def rerankq_system(url: str, model: str, logdir: Path, metrics_port: int,
                   worker_args: tuple[str, ...] = (), backend: str = "torch", baseline: str = "") -> System:
    """One rerankq worker; with ``baseline``, of that git commit's build, named ``rerankq @<commit>``."""
    from rerankq.local import WorkerProcess
    from rerankq.tasks import app, rerank

    app.conf.update(broker_url=url, result_backend=url)
    env = {"RERANKQ_BROKER_URL": url, "RERANKQ_RESULT_BACKEND": url, "RERANKQ_METRICS_PORT": str(metrics_port),
           "RERANKQ_BACKEND": backend}
    name = f"rerankq @{baseline}" if baseline else "rerankq"
    cwd = None
    if baseline:
        # Run from the checkout: a build from before the one-package layout has Celery import ``celeryconfig``
        # from the working directory first, which here would be this build's.
        cwd = logdir / f"rerankq-{baseline}"
        env.update(checkout(baseline, cwd))
    worker = WorkerProcess(f"bench.rerankq.{metrics_port}", worker_command(model, worker_args), env,
                           logdir / f"rerankq-{metrics_port}.log", f"bench-rerankq-{metrics_port}@localhost", cwd=cwd)
    worker.wait_ready(app)

    def send(request: Request) -> str:
        return str(rerank.apply_async((request.query, request.docs), queue=worker.queue).id)

    def stop() -> None:
        worker.stop()

    return System(name, send, lambda: [worker.proc.pid], stop)


def celery_peer(name: str, task: str, url: str, model: str, device: str, logdir: Path,
                prefetch: int) -> System:
    from bench import peer_tasks

    node = f"bench-{task}-{os.getpid()}@localhost"
    env = {**os.environ, "PEERS_REDIS_URL": url, "PEERS_MODEL": model, "PEERS_DEVICE": device,
           "PEERS_PREFETCH": str(prefetch), "PYTHONPATH": str(ROOT)}
    with open(logdir / f"{task}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.peer_tasks", "worker", "-Q", task,
                                 "--pool", "solo", "--loglevel", "WARNING", "-n", node, "--without-gossip",
                                 "--without-mingle"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    peer_tasks.app.conf.update(broker_url=url, result_backend=url)
    _until(lambda: bool(peer_tasks.app.control.ping(destination=[node], timeout=0.5)), 120, f"{name} worker",
           proc)
    sender = peer_tasks.app.tasks[task]

    def send(request: Request) -> str:
        return str(sender.apply_async((request.query, request.docs), queue=task).id)

    return System(name, send, lambda: [proc.pid], lambda: _stop(proc))


def infinity_system(binary: str, model: str, device: str, logdir: Path, completions: Completions) -> System:
    port = free_port()
    cuda = device.startswith("cuda")
    with open(logdir / "infinity.log", "wb") as log:
        proc = subprocess.Popen([binary, "v2", "--model-id", model, "--served-model-name", "bench",
                                 "--device", "cuda" if cuda else "cpu", "--dtype", "float16" if cuda else "float32",
                                 "--engine", "torch", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _until(lambda: _http_ok(f"{url}/health"), 300, "infinity-emb", proc)
    return http_system("infinity-emb", f"{url}/rerank", completions, lambda: [proc.pid], lambda: _stop(proc))


def serve_system(url: str, model: str, device: str, logdir: Path, completions: Completions,
                 baseline: str = "") -> System:
    """``rerankq serve`` in front of one rerankq worker, timed per HTTP request as infinity-emb is; with
    ``baseline``, both of that git commit's build, named ``rerankq serve @<commit>``."""
    from rerankq.local import ServerProcess, WorkerProcess
    from rerankq.tasks import app

    app.conf.update(broker_url=url, result_backend=url)
    env = {"RERANKQ_BROKER_URL": url, "RERANKQ_RESULT_BACKEND": url}
    name = f"rerankq serve @{baseline}" if baseline else "rerankq serve"
    if baseline:
        env.update(checkout(baseline, logdir / f"serve-{baseline}"))
    tag = f"{os.getpid()}{baseline}"
    queue = f"bench.serve.{tag}"
    worker = WorkerProcess(queue, ["--model", model, "--device", device, "--loglevel", "WARNING"], env,
                           logdir / f"serve-worker-{tag}.log", f"bench-serve-{tag}@localhost")
    worker.wait_ready(app)
    server = ServerProcess(free_port(), {**env, "RERANKQ_GPU_QUEUE": queue, "RERANKQ_SERVE_TIMEOUT_S": "1800"},
                           logdir / f"serve-{tag}.log")
    server.wait_ready()

    def stop() -> None:
        server.stop()
        worker.stop()

    return http_system(name, f"{server.url}/rerank", completions,
                       lambda: [worker.proc.pid, server.proc.pid], stop)


def http_system(name: str, url: str, completions: Completions, pids: Callable[[], list[int]],
                stop: Callable[[], None]) -> System:
    """A rerank server over HTTP, one body for all (Cohere's shape, which infinity-emb and rerankq serve
    take alike), 64 client threads, each request marked done when its answer is read."""
    pool = ThreadPoolExecutor(64)
    counter = iter(range(10**9))
    failures: list[str] = []

    def post(task_id: str, request: Request) -> None:
        body = json.dumps({"model": "bench", "query": request.query, "documents": request.docs,
                           "return_documents": False}).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=1800) as response:
                results = json.loads(response.read())["results"]
            if len(results) != len(request.docs):
                failures.append(f"{len(results)} results for {len(request.docs)} documents")
        except Exception as exc:  # any failure is recorded; the run then reports no figure
            failures.append(repr(exc))
        finally:
            completions.mark(task_id)  # so the run ends either way

    def send(request: Request) -> str:
        task_id = f"{name}-{next(counter)}"
        pool.submit(post, task_id, request)
        return task_id

    def halt() -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        stop()

    system = System(name, send, pids, halt)
    system.failures = failures
    return system


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout}s")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
