"""Jobs whose caller is gone are dropped before any forward batch: an HTTP client that closes its socket, an
``arerank`` cancelled. Real Redis, a real worker (a simulated GPU that records every batch's docs), a real
``rerankq serve``, a real socket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from rerankq.local import ServerProcess
from rerankq.producer import arerank
from rerankq.redis_server import free_port
from rerankq.tasks import Result
from rerankq.tasks import rerank as rerank_task
from tests.conftest import StartWorker, eventually
from tests.test_metrics import scrape

pytestmark = pytest.mark.integration


def test_a_caller_gone_before_its_turn_is_never_scored(start_worker: StartWorker, redis_url: str,
                                                       tmp_path: Path) -> None:
    record, port = tmp_path / "batches.jsonl", free_port()
    # One pair per forward batch of 200 ms, one job in the window: the backlog below is 4 s of work.
    worker = start_worker("--ranker", "simulated", "--model", f"latency_ms=200,token_us=0,record={record}",
                          "--metrics-port", str(port), RERANKQ_MAX_BATCH_TOKENS="1", RERANKQ_MAX_CHUNK_JOBS="1")
    backlog = [rerank_task.apply_async(("bread", [f"bread {i} {j}" for j in range(5)]), queue=worker.queue)
               for i in range(4)]
    server = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                         "RERANKQ_GPU_QUEUE": worker.queue}, tmp_path / "serve.log")
    server.wait_ready()
    try:
        host, http_port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"query": "bread", "documents": ["left-by-http"]}).encode()
        client = socket.create_connection((host, int(http_port)))
        client.sendall(b"POST /v1/rerank HTTP/1.1\r\nhost: rerankq\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))

        async def cancelled_and_kept() -> Result:
            gone = asyncio.ensure_future(arerank("bread", ["left-by-arerank"], queue=worker.queue, timeout=60))
            kept = asyncio.ensure_future(arerank("bread", ["kept"], queue=worker.queue, timeout=60))
            await asyncio.sleep(1.0)  # all three sent, all waiting behind the backlog
            client.close()  # the HTTP client leaves while its job waits
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            return await kept

        kept = asyncio.run(cancelled_and_kept())
        assert kept.scores == [0.0] and all(Result.from_dict(h.get(timeout=60)) for h in backlog)
        time.sleep(0.5)
        scored = [doc for line in record.read_text().splitlines() for doc in json.loads(line)["docs"]]
        assert "kept" in scored and len(scored) == 4 * 5 + 1
        assert "left-by-http" not in scored and "left-by-arerank" not in scored
        assert scrape(port)["rerankq_jobs_cancelled_total"] == 2
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_a_storm_of_cancellations_never_starves_the_senders(redis_url: str) -> None:
    """Celery's revoke broadcast holds a pooled connection while it takes a second one: threads revoking at once
    once held the whole pool and waited for ever, with every send behind them (one revoke alone, with a pool of
    one). With a pool of one connection, 20 threads cancelling and 20 sending at once all finish. (Its own
    database: kombu's pools are shared by every app on one URL, and their limit is global, so it is put back.)"""
    from celery import Celery
    from kombu import pools

    from rerankq.producer.revoker import Revoker

    limit = pools.get_limit()
    app = Celery("storm", broker=redis_url.rsplit("/", 1)[0] + "/7", set_as_current=False)
    app.conf.broker_pool_limit = 1
    try:
        assert app.pool.limit == 1  # made here: made lazily, by threads racing, they trip over its limit
        revoker = Revoker(app)
        done: list[str] = []

        def cancel(task_id: str) -> None:
            revoker.revoke(task_id)
            done.append(task_id)

        def send(i: int) -> None:
            app.send_task("rerankq.rerank", ("bread", [f"sent {i}"]), queue=f"storm.{i}")
            done.append(str(i))

        threads = [threading.Thread(target=cancel, args=(f"storm-{uuid.uuid4()}",), daemon=True) for _ in range(20)]
        threads += [threading.Thread(target=send, args=(i,), daemon=True) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(done) == 40
        eventually(lambda: revoker.idle(), 30, "every revoke broadcast")
        assert revoker.failures == 0
    finally:
        pools.set_limit(limit)
        app.close()


def test_a_revoke_goes_out_on_its_own_connection_while_the_pool_is_held(redis_url: str) -> None:
    """The app's one pooled connection held for the whole test: the revoke still reaches the workers' broadcast
    channel (it publishes on the revoker's own connection, not a pooled producer's)."""
    import redis
    from celery import Celery
    from kombu import pools

    from rerankq.producer.revoker import Revoker

    limit = pools.get_limit()
    url = redis_url.rsplit("/", 1)[0] + "/6"
    app = Celery("held", broker=url, set_as_current=False)
    app.conf.broker_pool_limit = 1
    listener = redis.Redis.from_url(url).pubsub()
    listener.psubscribe("*pidbox*")
    task_id = f"held-{uuid.uuid4()}"
    try:
        with app.pool.acquire(block=True):
            revoker = Revoker(app)
            revoker.revoke(task_id)
            heard: list[bytes] = []

            def revoked() -> bool:
                message = listener.get_message(timeout=0.2)
                if message and message["type"] == "pmessage":  # kombu's envelope, its body in base64
                    heard.append(base64.b64decode(json.loads(message["data"])["body"]))
                return any(task_id.encode() in body for body in heard)

            eventually(revoked, 30, "the revoke broadcast")
            assert revoker.idle() and revoker.failures == 0
    finally:
        listener.close()
        pools.set_limit(limit)
        app.close()


def test_a_forked_child_revokes_on_its_own_thread(redis_url: str) -> None:
    """A process forked after its parent revoked has no revoking thread of its parent's (fork copies none): it
    starts its own, and its revoke goes out."""
    from celery import Celery

    from rerankq.producer.revoker import Revoker

    app = Celery("forked", broker=redis_url.rsplit("/", 1)[0] + "/6", set_as_current=False)
    revoker = Revoker(app)
    revoker.revoke(f"parent-{uuid.uuid4()}")
    eventually(revoker.idle, 30, "the parent's revoke")
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its own revoke went out
        code = 1
        try:
            fresh = revoker._thread is None
            revoker.revoke(f"child-{uuid.uuid4()}")
            deadline = time.monotonic() + 20
            while not revoker.idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            code = 0 if fresh and revoker.idle() and revoker.failures == 0 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    app.close()
    assert os.waitstatus_to_exitcode(status) == 0
