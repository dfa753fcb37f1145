"""``rerankq serve`` against hostile clients, over real sockets: a body whose headers lie about its length,
a body built to multiply its validation errors, text that is not Unicode, and connections that never finish
their request. Each gets a short answer or is closed, and the server goes on answering others."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rerankq.local import ServerProcess
from rerankq.redis_server import free_port
from rerankq.tasks.connections import BrokerRedis
from tests.conftest import new_queue

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(redis_url: str, celery_app: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose queue no worker serves (nothing hostile may reach Redis), with a short read deadline."""
    queue = new_queue()
    process = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                          "RERANKQ_GPU_QUEUE": queue, "RERANKQ_SERVE_TIMEOUT_S": "0.5",
                                          "RERANKQ_SERVE_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
                                          "RERANKQ_SERVE_MAX_BODY_BYTES": "4000000"},
                            tmp_path_factory.mktemp("serve") / "serve.log")
    process.wait_ready()
    yield process
    process.stop()
    broker = BrokerRedis(celery_app)
    try:
        assert sum(broker.client.llen(name) for name in broker.queue_lists(queue)) == 0  # none reached Redis
    finally:
        broker.close()


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _raw(server: ServerProcess, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request as given and return the whole answer (the server closes or answers once)."""
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # it may answer and close before the rest is sent
            for chunk in chunks:
                sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 20:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        return answer


def test_a_body_with_both_content_length_and_chunked_is_refused_unread(server: ServerProcess) -> None:
    """2c4db98 trusted the Content-Length (10) and read the chunked body whole: 40 MB parsed."""
    body = json.dumps({"query": "q", "documents": ["x" * 1000] * 5000}).encode()  # 5 MB, over the 4 MB limit
    head = (b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunks = [b"%x\r\n%s\r\n" % (len(part), part) for part in (body[i:i + 65536] for i in range(0, len(body), 65536))]
    answer = _raw(server, head, [*chunks, b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:500]
    assert b"connection: close" in answer.lower()  # what follows on it is not read as another request
    assert httpx.get(f"{server.url}/health", timeout=5).status_code in (200, 503)


def test_a_validation_error_answer_stays_small_however_many_items_are_wrong(server: ServerProcess) -> None:
    """2 MB of ``[0,0,...]`` made a 300 MB answer (an error per item) and 3.2 GB of memory."""
    zeros = b'{"query": "q", "documents": [' + b",".join([b"0"] * 1_000_000) + b"]}"
    answer = httpx.post(f"{server.url}/v1/rerank", content=zeros, headers={"content-type": "application/json"},
                        timeout=30)
    assert answer.status_code == 422
    assert len(answer.content) < 1000, len(answer.content)
    assert "1000000 documents is over the limit of 1000 per request (RERANKQ_MAX_DOCS)" in answer.json()["error"]
    wrong = httpx.post(f"{server.url}/rerank", json={"query": "q", "texts": [0] * 900}, timeout=30)
    assert wrong.status_code == 422 and len(wrong.content) < 2000, len(wrong.content)
    reasons = wrong.json()["error"]
    assert re.search(r" \(and 8\d\d more\)$", reasons) and reasons.count(";") == 9, reasons  # ten shown
    assert "texts.0: Input should be a valid string" in reasons


@pytest.mark.parametrize("body", [
    b'{"query": "q", "texts": ["a \\ud800 b"], "return_text": true}',
    b'{"query": "q \\udfff", "documents": ["a"], "return_documents": true}',
])
def test_a_lone_surrogate_gets_422_before_redis(server: ServerProcess, body: bytes) -> None:
    """2c4db98 queued it, and answered 500 with a serialisation error once it was scored."""
    path = "/rerank" if b"texts" in body else "/v1/rerank"
    answer = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert "not valid Unicode text: a lone surrogate at character" in answer.json()["error"]


def test_connections_that_never_finish_their_request_are_closed_and_others_are_served(
        server: ServerProcess) -> None:
    """1,100 connections that never finish their headers made /health time out ("Too many open files")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096,
                                                    hard))
    slow = []
    try:
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=30)
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(sock)
        opened = time.monotonic()
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code in (200, 503), health.text  # answered (503: no worker serves its queue)
        deadline = opened + READ_TIMEOUT_S + 20  # each closed by the server, about READ_TIMEOUT_S after it opened
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
        assert sum(not _closed(sock) for sock in slow) == 0
        assert httpx.get(f"{server.url}/health", timeout=10).status_code in (200, 503)
    finally:
        for sock in slow:
            sock.close()


def test_a_request_has_its_read_deadline_from_its_own_first_byte(server: ServerProcess) -> None:
    """On a kept-alive connection, a request that starts after a pause and takes most of the deadline to
    arrive is answered; one that takes longer gets 408 and the connection closes."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as sock:
        sock.sendall(request)
        assert _answer(sock).startswith(b"HTTP/1.1 ")
        time.sleep(READ_TIMEOUT_S * 0.75)  # idle between requests (uvicorn's keep-alive allows 5 s)
        sock.sendall(request[:10])
        time.sleep(READ_TIMEOUT_S * 0.6)
        sock.sendall(request[10:])
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") or answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        sock.sendall(request[:10])  # and never the rest
        sock.settimeout(READ_TIMEOUT_S + 20)
        assert _answer(sock).startswith(b"HTTP/1.1 408 ")


def _answer(sock: socket.socket) -> bytes:
    """One answer's head and body (by its content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(4096)
        assert part, data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower())[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(4096)
    return data


def _closed(sock: socket.socket) -> bool:
    """Closed by the server (after its 408, if any) before the socket's timeout."""
    answer = b""
    try:
        while part := sock.recv(1024):
            answer += part
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the server
    return answer in (b"",) or answer.startswith(b"HTTP/1.1 408 ")
