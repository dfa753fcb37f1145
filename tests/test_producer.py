"""Producers against real workers: rerank(), await arerank(), submit_many() and `rerankq submit`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from rerankq.local import WorkerProcess
from rerankq.producer import arerank, rerank, submit_many
from rerankq.redis_server import RedisServer
from rerankq.tasks import BadJob, RerankTimeout, clock
from rerankq.tasks.connections import BrokerRedis
from tests.conftest import StartWorker, eventually, new_queue

pytestmark = pytest.mark.integration

WORDS = ["cat", "dog", "river", "bank", "money", "loan", "rate", "bread", "flour", "yeast", "queue", "worker",
         "batch", "token", "model", "score"]


@pytest.fixture(scope="module")
def queue(start_worker: StartWorker, tiny_model: Path) -> str:
    """Two worker processes serving one queue."""
    first = start_worker("--model", str(tiny_model))
    start_worker("--model", str(tiny_model), queue=first.queue)
    return first.queue


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> CrossEncoder:
    model: CrossEncoder = CrossEncoder(str(tiny_model), device="cpu")
    return model


def predict(reference: CrossEncoder, query: str, docs: list[str]) -> list[float]:
    return [float(s) for s in reference.predict([(query, d) for d in docs])] if docs else []


def make_jobs(n: int, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"id": f"job-{i}", "query": " ".join(rng.choices(WORDS, k=3)),
             "docs": [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]}
            for i in range(n)]


def test_rerank_returns_the_scores_predict_gives(queue: str, reference: CrossEncoder) -> None:
    docs = ["a loan at a low rate", "the river bank", "flour and yeast"]
    result = rerank("bank loan", docs, top_k=2, queue=queue, timeout=30)
    np.testing.assert_allclose(result.scores, predict(reference, "bank loan", docs), atol=1e-5)
    assert result.top is not None and len(result.top) == 2 and result.ranker == "cross-encoder"


def test_rerank_raises_the_jobs_own_error(queue: str) -> None:
    with pytest.raises(BadJob, match="docs\\[0\\] must be a string"):
        rerank("q", [7], queue=queue, timeout=30)  # type: ignore[list-item]


def test_rerank_with_no_worker_times_out_and_says_what_to_check(celery_app: Any) -> None:
    nobody = new_queue()
    started = time.monotonic()
    with pytest.raises(RerankTimeout, match=f"within 0.5s on queue {nobody}: are workers running"):
        rerank("q", ["d"], queue=nobody, timeout=0.5)
    assert time.monotonic() - started < 10
    _purge(celery_app, nobody)


def test_every_job_is_stamped_as_it_is_published_however_it_is_sent(celery_app: Any) -> None:
    """Queue wait counts from the publish, so Celery's own send_task (no RerankTask.apply_async) is stamped
    too, and after the call began building the message."""
    from rerankq.tasks.rerank import SENT_AT_HEADER, TASK_NAME

    nobody = new_queue()
    # Stamps are on Redis's clock (tasks/clock.py); a send may measure the offset again, within its error.
    slack = clock.MAX_ROUND_TRIP_S
    before = clock.now()
    celery_app.send_task(TASK_NAME, ("q", ["d"]), queue=nobody)
    rerank_task_message = celery_app.tasks[TASK_NAME].apply_async(("q", ["d"]), queue=nobody)
    after = clock.now()
    raw = BrokerRedis(celery_app).client.lrange(nobody, 0, -1)
    stamps = [json.loads(item)["headers"][SENT_AT_HEADER] for item in raw]
    assert len(stamps) == 2 and all(before - slack <= stamp <= after + slack for stamp in stamps)
    rerank_task_message.forget()
    _purge(celery_app, nobody)


def test_arerank_serves_200_concurrent_awaits_without_a_thread_each(queue: str, reference: CrossEncoder) -> None:
    jobs = make_jobs(200, seed=11)
    threads_seen: list[int] = []

    async def main() -> list[Any]:
        async def watch() -> None:
            while True:
                threads_seen.append(threading.active_count())
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(arerank(j["query"], j["docs"], queue=queue, timeout=60) for j in jobs))
        watcher.cancel()
        return list(results)

    before = threading.active_count()
    results = asyncio.run(main())
    for job, result in zip(jobs, results, strict=True):
        np.testing.assert_allclose(result.scores, predict(reference, job["query"], job["docs"]), atol=1e-5)
    assert max(threads_seen) < before + 10


def test_each_event_loop_closes_its_connections_as_it_shuts_down(tmp_path: Path) -> None:
    """``asyncio.run(arerank(...))`` 200 times in one process, garbage collection off: the open connections to
    Redis stay as many as after the first. 2c4db98 left each loop's two (results, pub/sub) open."""
    queue = new_queue()
    with RedisServer() as server:
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        worker = WorkerProcess(queue, ["--ranker", "simulated", "--model", "latency_ms=0,token_us=0"], env,
                               tmp_path / "worker.log", f"loops.{queue}@localhost")
        script = textwrap.dedent(f"""
            import asyncio, gc, json, redis
            from rerankq.producer import arerank
            gc.disable()
            client = redis.Redis.from_url({server.url!r})
            async def one():
                return await arerank("bread", ["flour"], queue={queue!r}, timeout=60)
            asyncio.run(one())
            before = len(client.client_list())
            for _ in range(200):
                assert asyncio.run(one()).scores
            print(json.dumps([before, len(client.client_list())]))
        """)
        try:
            eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
            done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                                  text=True, timeout=300)
        finally:
            worker.stop()
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.splitlines()[-1])
    assert after - before <= 2, (before, after)


def test_arerank_times_out_without_blocking_the_loop(celery_app: Any) -> None:
    nobody = new_queue()

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        with pytest.raises(RerankTimeout):
            await arerank("q", ["d"], queue=nobody, timeout=0.5)
        ticker.cancel()
        return ticks

    assert asyncio.run(main()) > 20  # the loop ran other work while it waited
    _purge(celery_app, nobody)


def test_submit_many_yields_every_job_once_including_failures(queue: str, reference: CrossEncoder) -> None:
    jobs = make_jobs(300)
    jobs[5]["docs"] = "not a list"
    got = dict(submit_many(jobs, max_in_flight=32, queue=queue))
    assert set(got) == {j["id"] for j in jobs}
    assert isinstance(got["job-5"], BadJob)
    for job in jobs[:50]:
        if job["id"] != "job-5":
            np.testing.assert_allclose(got[job["id"]].scores, predict(reference, job["query"], job["docs"]),
                                       atol=1e-5)


def submit(*args: str, redis_url: str, queue: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
           "RERANKQ_GPU_QUEUE": queue}
    return subprocess.Popen([sys.executable, "-m", "rerankq", "submit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ten_thousand_jobs_through_two_workers_each_id_once_with_predict_scores(
        queue: str, reference: CrossEncoder, redis_url: str, celery_app: Any, tmp_path: Path) -> None:
    jobs = make_jobs(10_000)
    source, output = write_jsonl(tmp_path / "jobs.jsonl", jobs), tmp_path / "scores.jsonl"
    broker = BrokerRedis(celery_app)
    interactive, bulk = broker.queue_lists(queue), broker.queue_lists(f"{queue}.bulk")
    unacked = broker.prefix + "unacked"  # kombu's delivered-not-acked hash
    already_unacked = broker.client.hlen(unacked)
    peak, peak_interactive, running = [0], [0], True

    def sample() -> None:  # the run's jobs in Redis: waiting in a lane, or delivered and not yet acked
        while running:
            with broker.client.pipeline(transaction=False) as pipe:
                for name in interactive + bulk:
                    pipe.llen(name)
                pipe.hlen(unacked)
                counts = pipe.execute()
            peak[0] = max(peak[0], sum(counts) - already_unacked)
            peak_interactive[0] = max(peak_interactive[0], sum(counts[:len(interactive)]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        done = submit(str(source), "-o", str(output), "--max-in-flight", "200", redis_url=redis_url, queue=queue)
        _, err = done.communicate(timeout=400)
    finally:
        running = False
        sampler.join()
        broker.close()
    assert done.returncode == 0, err
    assert "10000 jobs (0 failed)" in err and "served by: 10000 cross-encoder" in err
    assert "pairs/s, ETA" in err  # progress lines, as the output is not a terminal
    lines = read_output(output)
    assert sorted(line["id"] for line in lines) == sorted(j["id"] for j in jobs)
    by_id = {line["id"]: line for line in lines}
    for job in jobs[::50]:
        np.testing.assert_allclose(by_id[job["id"]]["scores"], predict(reference, job["query"], job["docs"]),
                                   atol=1e-5)
    assert 0 < peak[0] <= 200
    assert peak_interactive[0] == 0  # a run goes to the bulk lane unless told otherwise


def test_a_killed_run_resumes_to_a_complete_output_without_duplicates(
        queue: str, redis_url: str, tmp_path: Path) -> None:
    jobs = make_jobs(3000, seed=5)
    source, output = write_jsonl(tmp_path / "jobs.jsonl", jobs), tmp_path / "scores.jsonl"
    run = submit(str(source), "-o", str(output), "--max-in-flight", "64", redis_url=redis_url, queue=queue)
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 800) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    written = output.read_text().count("\n")
    assert 800 <= written < len(jobs)
    with open(output, "a") as f:
        f.write('{"id": "job-cut-sho')  # a line a crash cut short
    resumed = submit(str(source), "-o", str(output), "--resume", redis_url=redis_url, queue=queue)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ids = [line["id"] for line in read_output(output)]
    assert len(ids) == len(set(ids)) == len(jobs)
    assert f"{written} already done (resume)" in err


def test_bad_lines_go_to_the_errors_file_and_the_run_goes_on(queue: str, redis_url: str, tmp_path: Path) -> None:
    long_doc = "flour " * 5000
    records: list[Any] = [
        {"id": 1, "query": "bread", "docs": ["flour", long_doc]},
        "this is not json",
        {"id": 2, "docs": ["x"]},
        {"id": 3, "query": "q", "docs": "x"},
        [1, 2],
        {"id": 1, "query": "again", "docs": ["dup"]},
        {"id": "ünï", "query": "café ☕", "docs": ["crème brûlée", "\u4e2d\u6587", "\U0001F600 emoji"]},
        {"id": 4, "query": "q", "docs": ["d"], "top_k": 0},
        {"id": 5, "query": "bread", "docs": [long_doc], "long_docs": "refuse"},  # valid: the worker refuses it
        {"id": 6, "query": "bread", "docs": ["d"], "long_docs": "summarise"},
    ]
    source, output = write_jsonl(tmp_path / "jobs.jsonl", records), tmp_path / "out.jsonl"
    run = submit(str(source), "-o", str(output), redis_url=redis_url, queue=queue)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err  # some lines were bad
    lines = {line["id"]: line for line in read_output(output)}
    assert set(lines) == {1, "ünï", 5}
    assert all(len(lines[i]["scores"]) for i in (1, "ünï"))
    assert "docs[0] is" in lines[5]["error"] and "tokens, over" in lines[5]["error"]  # long_docs reached the worker
    errors = {e["line"]: e for e in read_output(tmp_path / "out.jsonl.errors.jsonl")}
    assert sorted(errors) == [2, 3, 4, 5, 6, 8, 10]
    assert errors[2]["error"].startswith("not JSON")
    assert "missing 'query'" in errors[3]["error"]
    assert "docs must be a list" in errors[4]["error"]
    assert "duplicate id 1 (first on line 1)" in errors[6]["error"]
    assert "top_k must be a positive integer" in errors[8]["error"]
    assert "long_docs must be one of" in errors[10]["error"]
    assert "6 input lines were not valid jobs" not in err and "7 input lines were not valid jobs" in err


def test_an_empty_file_is_a_run_of_zero_jobs(queue: str, redis_url: str, tmp_path: Path) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    run = submit(str(source), "-o", str(tmp_path / "out.jsonl"), redis_url=redis_url, queue=queue)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "done. 0 jobs" in err


def _purge(app: Any, queue: str) -> None:
    broker = BrokerRedis(app)
    broker.client.delete(*broker.queue_lists(queue))
    broker.close()
