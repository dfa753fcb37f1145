"""rerankq inside a web app that uses Celery for its own work, with Celery's conventional file names.

The wheel is built and installed into an environment of its own (its dependencies are this environment's),
and every process runs in a folder holding the web app's own ``tasks.py``, ``celeryconfig.py``, ``worker.py``
and ``server.py``, whose Celery app uses another Redis database: a rerankq worker, the web app's own Celery
worker (prefork, as Celery's default), the web app's main process and ``rerankq flower``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import free_port
from tests.conftest import answering

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("ops", "s3cret-for-tests")

WEB_TASKS = '''
from celery import Celery

import rerankq

app = Celery("webapp")
app.config_from_object("celeryconfig")


@app.task
def add(x, y):
    return x + y


@app.task
def rerank_in_a_task(query, docs, queue):
    return rerankq.rerank(query, docs, queue=queue, timeout=60).scores
'''

WEB_MAIN = '''
import json
import sys

import celery

import celeryconfig
import rerankq
import tasks

queue = sys.argv[1]
docs = ["flour, water and wild yeast", "a river bank", "sourdough starter feeding"]
out = {
    "add": tasks.add.delay(2, 3).get(timeout=60),
    "in_task": tasks.rerank_in_a_task.delay("what is a sourdough starter?", docs, queue).get(timeout=90),
    "in_main": rerankq.rerank("what is a sourdough starter?", docs, queue=queue, timeout=60).scores,
    "broker_url": tasks.app.conf.broker_url,
    "configured": celeryconfig.broker_url,
    "current_app": celery.current_app.main,
}
print(json.dumps(out))
'''

# A web app's own modules named as rerankq's subpackages once were: rerankq must never import them.
SHADOW = 'raise ImportError("the web app\'s own {name}.py was imported by rerankq")\n'


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (built,) = out.glob("rerankq-*.whl")
    return built


@pytest.fixture(scope="module")
def python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed; its dependencies come from this environment's
    site-packages, named in a ``.pth`` (plain path: the editable install's own ``.pth`` there is not run)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()
    (Path(site) / "dependencies.pth").write_text(f"{ours['purelib']}\n{ours['platlib']}\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return python


@pytest.fixture(scope="module")
def web_app(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Path:
    folder = tmp_path_factory.mktemp("webapp")
    (folder / "tasks.py").write_text(WEB_TASKS)
    (folder / "main.py").write_text(WEB_MAIN)
    own = web_redis(redis_url)
    (folder / "celeryconfig.py").write_text(f"broker_url = {own!r}\nresult_backend = {own!r}\n")
    for name in ("worker", "server", "producer", "integrations"):
        (folder / f"{name}.py").write_text(SHADOW.format(name=name))
    return folder


def env_for(redis_url: str) -> dict[str, str]:
    """The web app's environment: rerankq's settings, and Celery's own variables set for the web app's app
    (as a deployment configured by environment has them), which rerankq's app must not read."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    own = web_redis(redis_url)
    return {**env, "RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url, "RERANKQ_METRICS_PORT": "0",
            "CELERY_BROKER_URL": own, "CELERY_RESULT_BACKEND": own, "CELERY_LOADER": "default"}


def web_redis(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/5"


def test_the_wheel_installs_one_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"rerankq"}
    for package in ("tasks", "worker", "worker/upstream", "producer", "server", "integrations"):
        assert f"rerankq/{package}/__init__.py" in names, package
    assert "rerankq/celeryconfig.py" in names and "rerankq/py.typed" in names
    scripts = sorted(path.name for path in (ROOT / "tasks" / "lua").glob("*.lua"))  # every Lua script rerankq runs
    assert scripts and [name for name in scripts if f"rerankq/tasks/lua/{name}" not in names] == []


@pytest.fixture(scope="module")
def rerankq_worker(python: Path, web_app: Path, redis_url: str, celery_app: Any, tiny_model: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    queue = f"webapp-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(queue, ["--model", str(tiny_model), "--device", "cpu"], env_for(redis_url),
                           tmp_path_factory.mktemp("rerankq-worker") / "worker.log", f"webapp.{queue}@localhost",
                           python=str(python), cwd=web_app)
    worker.wait_ready(celery_app)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def web_worker(python: Path, web_app: Path, redis_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """The web app's own Celery worker, started as its docs say (``celery -A tasks worker``), prefork."""
    log = tmp_path_factory.mktemp("web-worker") / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(python), "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork",
                                 "--concurrency", "1", "--hostname", f"web-{uuid.uuid4().hex[:6]}@localhost"],
                                cwd=web_app, env=env_for(redis_url), stdout=out, stderr=subprocess.STDOUT)
    yield proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def flower(python: Path, web_app: Path, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = RerankqProcess(["flower", "--port", str(port), "--address", "127.0.0.1"],
                             {**env_for(redis_url), "FLOWER_BASIC_AUTH": ":".join(AUTH)},
                             tmp_path_factory.mktemp("flower") / "flower.log", python=str(python), cwd=web_app)
    yield answering(f"http://127.0.0.1:{port}", process)
    process.stop()


def test_a_celery_web_app_calls_rerankq_from_its_main_process_and_inside_its_own_tasks(
        python: Path, web_app: Path, redis_url: str, rerankq_worker: WorkerProcess,
        web_worker: subprocess.Popen[bytes], flower: str) -> None:
    done = subprocess.run([str(python), "main.py", rerankq_worker.queue], cwd=web_app, env=env_for(redis_url),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nrerankq worker:\n{rerankq_worker.log()[-3000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["add"] == 5  # the web app's own task, on its own broker
    assert len(out["in_task"]) == 3 and len(out["in_main"]) == 3
    assert out["in_task"] == pytest.approx(out["in_main"])  # the same job, scored by rerankq's worker both times
    assert out["broker_url"] == out["configured"] and out["broker_url"].endswith("/5")
    assert out["current_app"] == "webapp"  # rerankq's app never became the process's default

    # `rerankq flower` in the web app's folder is rerankq's Flower: it shows the two jobs (rerankq.rerank, on
    # rerankq's worker), never the web app's own tasks.
    deadline = time.monotonic() + 30
    while True:
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        names = [task.get("name") for task in tasks.values()]
        if names.count("rerankq.rerank") >= 2:
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(0.2)
    assert set(names) == {"rerankq.rerank"}
    assert {task.get("worker") for task in tasks.values()} == {rerankq_worker.node}
