"""rerankq over TLS: a TLS-only Redis (Debian's redis-server, built with TLS) and certificates the test makes.

Every process kind works over ``rediss://`` with the CA named in the URL; one given the wrong CA exits at once
saying so, instead of retrying a connection that can never succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rerankq.local import RerankqProcess, ServerProcess, WorkerProcess
from rerankq.redis_server import RedisServer, TlsFiles, free_port
from tests.conftest import eventually, needs_system_redis, new_queue, rerankq
from tests.faults.jobs import a_bulk_run_completes, flower_shows_a_job

pytestmark = [pytest.mark.integration, needs_system_redis]



def _issue(directory: Path) -> tuple[TlsFiles, Path]:
    """A CA and a certificate it signs for 127.0.0.1, and a second CA that signed nothing."""
    import trustme

    ca, stranger = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    stranger.cert_pem.write_to_path(str(directory / "wrong-ca.pem"))
    return files, directory / "wrong-ca.pem"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    files, wrong_ca = _issue(tmp_path_factory.mktemp("tls"))
    with RedisServer(tls=files) as server:
        yield server, wrong_ca


@pytest.fixture(scope="module")
def env(tls: tuple[RedisServer, Path]) -> dict[str, str]:
    # The URL names the CA and nothing else: rerankq asks for the certificate to be verified.
    assert "ssl_cert_reqs" not in tls[0].url
    return {"RERANKQ_BROKER_URL": tls[0].url, "RERANKQ_GPU_QUEUE": new_queue()}


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    queue = env["RERANKQ_GPU_QUEUE"]
    process = WorkerProcess(queue, ["--ranker", "simulated"], env, tmp_path_factory.mktemp("w") / "worker.log",
                            f"tls.{queue}@h")
    eventually(lambda: " ready." in process.log() or process.proc.poll() is not None, 90, "the worker is ready")
    assert process.proc.poll() is None, process.log()
    yield process
    process.stop()


def test_the_server_takes_tls_only(tls: tuple[RedisServer, Path]) -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls[0].port, socket_timeout=2).ping()


def test_rerank_and_arerank_are_answered_over_tls(worker: WorkerProcess, env: dict[str, str]) -> None:
    script = textwrap.dedent("""
        import asyncio, json
        from rerankq.producer import arerank, rerank
        sync = rerank("capital of france", ["paris is the capital of france", "bananas"], timeout=60)
        awaited = asyncio.run(arerank("capital of france", ["bananas", "paris", "lyon"], timeout=60))
        print(json.dumps([sync.ranker, len(sync.scores), awaited.ranker, len(awaited.scores)]))
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["simulated", 2, "simulated", 3]


def test_a_bulk_run_completes_over_tls(worker: WorkerProcess, env: dict[str, str], tmp_path: Path) -> None:
    a_bulk_run_completes(env, tmp_path)


def test_the_watchdog_and_status_work_over_tls(worker: WorkerProcess, env: dict[str, str], tmp_path: Path) -> None:
    watchdog = RerankqProcess(["watchdog"], env, tmp_path / "watchdog.log")
    try:
        def seen() -> bool:
            done = rerankq("status", "--json", env=env)
            assert done.returncode == 0, done.stderr
            status = json.loads(done.stdout)
            return bool(status["route"]["watchdog"]) and worker.node in {w["node"] for w in status["workers"]}

        eventually(seen, 60, f"status shows the watchdog's route and the worker: {watchdog.log()}")
    finally:
        assert watchdog.stop() == 0, watchdog.log()


def test_flower_shows_jobs_over_tls(worker: WorkerProcess, env: dict[str, str], tmp_path: Path) -> None:
    flower_shows_a_job(env, worker.node, tmp_path)


def test_rerankq_serve_answers_over_tls(worker: WorkerProcess, env: dict[str, str], tmp_path: Path) -> None:
    server = ServerProcess(free_port(), env, tmp_path / "serve.log")
    try:
        server.wait_ready()
        answer = httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": ["q d", "x"]}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta"]["passthrough"] is False
        eventually(lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 200, 30, "healthy")
    finally:
        server.stop()


@pytest.mark.parametrize("command", [["worker", "--ranker", "simulated"], ["watchdog"], ["status"],
                                     ["serve", "--port", str(free_port())]])
def test_the_wrong_ca_fails_at_once_saying_so(tls: tuple[RedisServer, Path], command: list[str]) -> None:
    server, wrong_ca = tls
    wrong = server.url.split("?")[0] + f"?ssl_ca_certs={wrong_ca}"
    started = time.monotonic()
    done = rerankq(*command, env={"RERANKQ_BROKER_URL": wrong}, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "ssl_ca_certs=" in done.stderr
    assert time.monotonic() - started < 30  # not a retry loop
