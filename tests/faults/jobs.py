"""Jobs sent from a producer process to a Redis of a test's own, where each of them is, and Flower showing
one."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import httpx
import redis

from rerankq.local import RerankqProcess, WorkerProcess
from rerankq.redis_server import free_port
from rerankq.tasks import memory
from rerankq.tasks.connections import BrokerRedis
from rerankq.worker import inflight
from tests.conftest import eventually, rerankq

AUTH = ("ops", "s3cret-for-tests")


def send(env: dict[str, str], queue: str, count: int, ids: list[str] | None = None) -> list[str]:
    """Send ``count`` jobs to ``queue`` from a producer process (with ``ids``: jobs of those ids); returns their
    ids."""
    script = textwrap.dedent(f"""
        import json
        from rerankq.tasks import rerank
        ids = [rerank.apply_async(("bread", ["bread and flour", "stone"]), queue={queue!r}, task_id=task_id).id
               for task_id in {ids or [None] * count!r}]
        print(json.dumps(ids))
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def where(client: redis.Redis, queue: str, ids: list[str], node: str) -> dict[str, int]:
    """How many of ``ids`` are waiting, unacked (held or left for the reclaim), in the in-flight lists of
    worker ``node``, or answered, read in one atomic step (a script: a full Redis refuses MULTI); a job in none
    of them is lost."""
    in_flight = [f"rerankq:inflight:{node}:{queue}{lane}" for lane in ("", ".bulk")]
    read = """
    local lists = {}
    for i = 2, #KEYS do lists[#lists + 1] = redis.call('LRANGE', KEYS[i], 0, -1) end
    local answered = {}
    for i = 1, #ARGV do answered[i] = redis.call('EXISTS', 'celery-task-meta-' .. ARGV[i]) end
    return {redis.call('HVALS', KEYS[1]), lists, answered}"""
    keys = ["unacked", queue, *in_flight]
    unacked, lists, answered = client.eval(memory.script(client, read), len(keys), *keys, *ids)  # type: ignore[misc]
    waiting, flight = lists[0], [raw for items in lists[1:] for raw in items]

    def present(raws: list[bytes]) -> set[str]:
        return {job for job in ids for raw in raws if job.encode() in raw}

    done = {job for job, flag in zip(ids, answered, strict=True) if flag}
    seen = [present(waiting), present(unacked), present(flight), done]
    return {"waiting": len(seen[0]), "unacked": len(seen[1]), "in flight": len(seen[2]), "answered": len(done),
            "lost": len(set(ids).difference(*seen))}


def flower_shows_a_job(env: dict[str, str], node: str, tmp_path: Path) -> None:
    """``rerankq flower`` on ``env``'s Redis lists a job a ``rerankq submit`` run sent as done by ``node``."""
    port = free_port()
    flower = RerankqProcess(["flower", "--port", str(port), "--address", "127.0.0.1"],
                            {**env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}, tmp_path / "flower.log")
    try:
        url = f"http://127.0.0.1:{port}"

        def answered() -> bool:
            assert flower.proc.poll() is None, flower.log()
            try:
                return httpx.get(url, timeout=1).status_code in (200, 401)
            except httpx.TransportError:
                return False

        eventually(answered, 60, "Flower answers")
        source = tmp_path / "one.jsonl"
        source.write_text(json.dumps({"id": "flower", "query": "q", "docs": ["q d"]}) + "\n")
        sent = rerankq("submit", str(source), "-o", str(tmp_path / "flower-out.jsonl"), env=env)
        assert sent.returncode == 0, sent.stderr

        def shown() -> bool:
            tasks = httpx.get(f"{url}/api/tasks", auth=AUTH, timeout=5).json()
            return any(t.get("state") == "SUCCESS" and t.get("worker") == node for t in tasks.values())

        eventually(shown, 30, "Flower lists the job as done by the worker")
    finally:
        flower.stop()


def a_bulk_run_completes(env: dict[str, str], tmp_path: Path) -> None:
    """A ``rerankq submit`` run of 20 jobs on ``env``'s Redis writes every id once."""
    source, output = tmp_path / "jobs.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": i, "query": f"q {i}", "docs": ["d one", "d two"]}) + "\n"
                              for i in range(20)))
    done = rerankq("submit", str(source), "-o", str(output), env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["id"] for line in output.read_text().splitlines()) == list(range(20))


def left_to_come_back(broker: BrokerRedis, ids: Collection[str]) -> int:
    """How many of the jobs ``ids`` could still be delivered again: with a record in kombu's unacked hash, or in
    an in-flight list of any worker."""
    wanted = set(ids)
    records = [json.loads(raw)[0] for raw in broker.client.hvals(broker.unacked_keys()[1])]
    held = {message["headers"]["id"] for message in records} & wanted
    for key in broker.client.hkeys(inflight.registry_key(broker.prefix)):
        for raw in broker.client.lrange(key, 0, -1):
            with contextlib.suppress(ValueError, KeyError, TypeError):  # another test's junk
                held |= {json.loads(raw)["headers"]["id"]} & wanted
    return len(held)


def scored_once(served: Callable[[], int], ids: Collection[str], left: Callable[[], int], past_s: float,
                what: str) -> None:
    """Each of the jobs ``ids`` scored exactly once: ``served()`` (scorings reported by the workers) reaches
    their number, none can come back (``left()`` is 0), and ``past_s`` later (past the visibility timeout, the
    reclaim's grace and a report) it has not moved. Passing the moment the count reaches the number missed
    every duplicate that came later."""
    eventually(lambda: served() >= len(ids), 30, what)
    eventually(lambda: left() == 0, 30, f"{what}: none of them left unacked or in flight")
    time.sleep(past_s)
    assert served() == len(ids), f"{what}: {served()} scorings for {len(ids)} jobs"


class Producer:
    """A producer process that sends when told, keeping its connections open in between."""

    def __init__(self, env: dict[str, str], queue: str) -> None:
        script = textwrap.dedent(f"""
            import json, sys
            from rerankq.tasks import rerank
            handles = []
            for line in sys.stdin:
                if line.strip() == "wait":  # every result, as a caller gets it (Celery's result listener)
                    print(json.dumps(sum(1 for h in handles if h.get(timeout=60)["scores"])), flush=True)
                    continue
                sent = [rerank.apply_async(("bread", ["bread and flour", "stone"]), queue={queue!r})
                        for _ in range(int(line))]
                handles += sent
                print(json.dumps([h.id for h in sent]), flush=True)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env}, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, count: int) -> list[str]:
        return list(self._ask(str(count)))

    def served_first(self, client: redis.Redis, worker: WorkerProcess, count: int = 20) -> list[str]:
        """Once ``worker`` is ready, ``count`` jobs sent and answered on ``client``'s server: their ids."""
        eventually(lambda: " ready." in worker.log(), 60, "the worker is ready")
        ids = self.send(count)
        eventually(lambda: where(client, worker.queue, ids, worker.node)["answered"] == count, 30, "served first")
        return ids

    def answered(self) -> int:
        """How many of the jobs it sent its callers got answers for, waiting for each."""
        return int(self._ask("wait"))

    def _ask(self, line: str) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def steady_sends(env: dict[str, str], queue: str, kill: object, until: object) -> tuple[list[str], list[str], int]:
    """Jobs sent one every 20 ms by a producer process while ``kill`` fails the master over, until ``until``;
    returns the ids the sends accepted, the ids of the sends that raised, and how many sends came after the
    kill. The producer is stopped between sends: killed in one, a job it sent was served with no id here to
    count it by (a scoring too many, under load about one run in eight)."""
    script = textwrap.dedent(f"""
        import json, signal, sys, time, uuid
        from rerankq.tasks import rerank
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        deadline = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < deadline and not stop:
            task_id = str(uuid.uuid4())
            try:
                rerank.apply_async(("bread", ["bread and flour", "stone"]), queue={queue!r}, retry=False,
                                   task_id=task_id)
                print(json.dumps(task_id), flush=True)
            except Exception as exc:
                print(json.dumps({{"failed": repr(exc), "id": task_id}}), flush=True)
            time.sleep(0.02)
    """)
    producer = subprocess.Popen([sys.executable, "-c", script, "60"], env={**os.environ, **env},
                                stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(producer.stdout or []), daemon=True)
    reader.start()
    eventually(lambda: len(lines) >= 20, 60, "the producer sends")
    at_kill = len(lines)
    kill()  # type: ignore[operator]
    eventually(until, 30, "a replica promoted")  # type: ignore[arg-type]
    time.sleep(3)
    producer.terminate()
    try:
        assert producer.wait(30) == 0, "the producer stops after its send of the moment"
    finally:
        producer.kill()
    reader.join(5)
    answers = [json.loads(line) for line in lines if line.strip()]
    refused = [a for a in answers if isinstance(a, dict)]
    return ([a for a in answers if isinstance(a, str)], [a["id"] for a in refused], len(answers) - at_kill)


def answered(client: redis.Redis, ids: list[str]) -> list[str]:
    """Those of ``ids`` with a result."""
    return [job for job in ids if client.exists(f"celery-task-meta-{job}")]


def route(env: dict[str, str]) -> str:
    """Where the last route change ``rerankq status`` shows sends new jobs."""
    status = rerankq("status", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    changes = [line for line in status.stdout.splitlines() if "new jobs go to" in line]
    return changes[0].rsplit("; ", 1)[-1].strip() if changes else ""


def each_answered_once(client: redis.Redis, queue: str, node: str, ids: list[str], refused: list[str],
                       served: Callable[[], int], past_s: float, what: str) -> None:
    """Every job of ``ids`` answered on ``client``'s server, none left waiting, unacked or in flight, and each
    scored once (``scored_once``), a refused send that reached Redis all the same (its reply lost) among them."""
    eventually(lambda: where(client, queue, ids, node)["answered"] == len(ids), 60, "all answered")

    def left() -> int:
        jobs = where(client, queue, ids + refused, node)
        return jobs["waiting"] + jobs["unacked"] + jobs["in flight"]
    eventually(lambda: left() == 0, 30, "none left unacked or in flight")
    scored_once(served, ids + answered(client, refused), left, past_s, what)
