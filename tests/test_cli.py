"""The console script: model-load failures, help, and the README's demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import rerankq

pytestmark = pytest.mark.integration


def test_a_worker_whose_model_cannot_load_exits_non_zero_with_the_reason(tmp_path: Path,
                                                                         redis_url: str) -> None:
    missing = tmp_path / "no-such-model"
    done = rerankq("worker", "--model", str(missing), env={"RERANKQ_BROKER_URL": redis_url})
    assert done.returncode != 0
    assert f"cannot load the cross-encoder model '{missing}' on cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_asked_for_a_gpu_it_cannot_see_says_so(redis_url: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = rerankq("worker", "--device", "cuda:0", env={"RERANKQ_BROKER_URL": redis_url})
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr


def test_a_bad_setting_stops_the_worker_with_the_variable_named() -> None:
    done = rerankq("worker", env={"RERANKQ_MAX_CHUNK_TOKENS": "lots"})
    assert done.returncode != 0
    assert "RERANKQ_MAX_CHUNK_TOKENS='lots' is not a valid int" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_demo_reranks_the_sample_set_offline() -> None:
    done = rerankq("demo", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr  # its results' handles outlived the embedded Redis
    out = done.stdout
    assert "served by: fast (all-MiniLM-L6-v2)" in out
    # The relevant passage of the first sample ranks first.
    first = out.split("query: How do I keep a sourdough starter alive?")[1]
    assert first.strip().splitlines()[0].endswith("keep it at room temperature so the yeast stays active.")


@pytest.mark.parametrize(("env", "message"), [
    ({"RERANKQ_HIGH_WAIT_S": "1", "RERANKQ_LOW_WAIT_S": "2"},
     "RERANKQ_LOW_WAIT_S=2.0 must be below RERANKQ_HIGH_WAIT_S=1.0"),
    ({"RERANKQ_POLL_MS": "-5"}, "RERANKQ_POLL_MS must be >= 0"),
])
def test_a_watchdog_with_bad_marks_refuses_to_start(env: dict[str, str], message: str, redis_url: str) -> None:
    done = rerankq("watchdog", env={"RERANKQ_BROKER_URL": redis_url, **env}, timeout=30)
    assert done.returncode == 2
    assert f"rerankq: {message}" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_prints_queues_route_and_workers(redis_url: str) -> None:
    env = {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_GPU_QUEUE": "status.gpu", "RERANKQ_CPU_QUEUE": "status.cpu"}
    table = rerankq("status", env=env, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "route: gpu (no route state: the watchdog is not running" in table.stdout
    assert table.stdout.splitlines()[1].startswith("redis: ") and "no maxmemory" in table.stdout
    assert table.stdout.splitlines()[3].split() == ["queue", "lane", "waiting", "held", "backlog", "workers",
                                                    "pairs/s", "est.", "wait"]
    as_json = rerankq("status", "--json", env=env, timeout=30)
    figures = json.loads(as_json.stdout)
    assert [(q["queue"], q["lane"]) for q in figures["queues"]] == [
        ("status.gpu", "interactive"), ("status.cpu", "interactive"), ("status.gpu.bulk", "bulk"),
        ("status.cpu.bulk", "bulk")]
    assert figures["route"]["route"] == "gpu" and figures["workers"] == []
    assert figures["redis"]["limit"] == 0 and figures["redis"]["full"] is False


def test_status_without_redis_says_where_it_looked() -> None:
    done = rerankq("status", env={"RERANKQ_BROKER_URL": "redis://:secret@127.0.0.1:1/0"}, timeout=60)
    assert done.returncode == 2
    assert "cannot read the status from Redis at redis://:**@127.0.0.1:1/0" in done.stderr
    assert "secret" not in done.stderr
