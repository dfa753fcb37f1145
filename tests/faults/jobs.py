"""Jobs sent from a producer process to a Redis of a test's own, and where each of them is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import redis

from tasks import memory


def send(env: dict[str, str], queue: str, count: int) -> list[str]:
    """Send ``count`` jobs to ``queue`` from a producer process; returns their ids."""
    script = textwrap.dedent(f"""
        import json
        from tasks import rerank
        ids = [rerank.apply_async(("bread", ["bread and flour", "stone"]), queue={queue!r}).id
               for _ in range({count})]
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
