"""Jobs whose caller is gone are dropped before any forward batch: an HTTP client that closes its socket, an
``arerank`` cancelled. Real Redis, a real worker (a simulated GPU that records every batch's docs), a real
``rerankq serve``, a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import pytest

from rerankq.local import ServerProcess
from rerankq.producer import arerank
from rerankq.redis_server import free_port
from rerankq.tasks import Result
from rerankq.tasks import rerank as rerank_task
from tests.conftest import StartWorker
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
