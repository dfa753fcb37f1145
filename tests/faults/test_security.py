"""Locked-down defaults: a password-protected Redis end to end, and result keys that expire."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from rerankq.local import WorkerProcess
from rerankq.redis_server import RedisServer
from rerankq.tasks import rerank
from tests.conftest import eventually, new_queue

pytestmark = pytest.mark.integration


def test_a_password_protected_redis_serves_with_the_password_and_refuses_without(tmp_path: Path) -> None:
    queue = new_queue()
    with RedisServer(password="correct horse battery staple") as server:
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_GPU_QUEUE": queue}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url("redis://" + server.url.split("@", 1)[1]).ping()
        worker = WorkerProcess(queue, ["--ranker", "simulated"], env, tmp_path / "worker.log", f"auth.{queue}@h")
        try:
            _serve_with_the_password(server, worker, env, tmp_path)
        finally:
            worker.stop()


def _serve_with_the_password(server: RedisServer, worker: WorkerProcess, env: dict[str, str],
                             tmp_path: Path) -> None:
    eventually(lambda: " ready." in worker.log(), 60, "the worker connects with the password")
    source, output = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "query": "q", "docs": ["q d"]}) + "\n")
    done = subprocess.run([sys.executable, "-m", "rerankq", "submit", str(source), "-o", str(output)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text())["id"] == 1

    wrong = "redis://:wrong@" + server.url.split("@", 1)[1]
    status = subprocess.run([sys.executable, "-m", "rerankq", "status"], capture_output=True, text=True,
                            env={**os.environ, "RERANKQ_BROKER_URL": wrong}, timeout=120)
    assert status.returncode != 0 and "Traceback" not in status.stderr
    assert "password" in (status.stdout + status.stderr).lower()


def test_result_keys_expire(celery_app: Any, start_worker: Any) -> None:
    worker = start_worker("--ranker", "simulated")
    handle = rerank.apply_async(("q", ["q d"]), queue=worker.queue)
    handle.get(timeout=60)
    ttl = celery_app.backend.client.ttl(celery_app.backend.get_key_for_task(handle.id))
    assert 0 < ttl <= 3600  # RERANKQ_RESULT_EXPIRES
