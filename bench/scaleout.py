"""Scale-out: jobs/s of 1, 2, 4, 8 rerankq worker replicas on one queue, with the simulated GPU ranker.

The simulated ranker sleeps ``latency_ms`` + ``token_us`` per padded token for each forward batch and uses
no CPU, so a 2-core machine can stand in for eight GPUs: what is measured is rerankq's own share, the
queue, the chunking and the result writes, as replicas are added.

    python bench/scaleout.py --replicas 1,2,4,8 --requests 1600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.systems import Completions  # noqa: E402
from bench.workload import workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--max-docs", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--model", default="latency_ms=20,token_us=5", help="the simulated ranker's costs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaleout.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts

    from rerankq.local import WorkerProcess
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app, rerank

    requests = workload(1, args.requests, 1, args.max_docs, 5, args.max_words)
    counts = [int(n) for n in args.replicas.split(",")]
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url)
        completions = Completions(server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        workers = [WorkerProcess("bench.scaleout", ["--ranker", "simulated", "--model", args.model,
                                                    "--device", f"cuda:{i}", "--loglevel", "WARNING"], env,
                                 Path(tmp) / f"worker{i}.log", f"bench-{i}-{os.getpid()}@localhost")
                   for i in range(max(counts))]
        try:
            for worker in workers:
                worker.wait_ready(app)
            for _ in range(args.repeats):
                for n in counts:
                    # Only the first n serve: the others are paused (SIGSTOP takes nothing from the queue).
                    for i, worker in enumerate(workers):
                        worker.proc.send_signal(signal.SIGCONT if i < n else signal.SIGSTOP)
                    time.sleep(1.5)  # a paused worker's wait on the queue ends within its 1 s timeout
                    start = time.perf_counter()
                    ids = [rerank.apply_async((r.query, r.docs), queue="bench.scaleout").id for r in requests]
                    done = completions.wait([str(i) for i in ids])
                    seconds[n].append(max(done.values()) - start)
        finally:
            for worker in workers:
                worker.proc.send_signal(signal.SIGCONT)
                worker.stop()

    rate = {n: len(requests) / statistics.median(ts) for n, ts in seconds.items()}
    one = rate[counts[0]] / counts[0]
    print(f"\n{len(requests)} requests, simulated ranker {args.model!r}; medians of {args.repeats}\n")
    print("| replicas | median s | jobs/s | vs N x one |\n| --- | --- | --- | --- |")
    for n in counts:
        print(f"| {n} | {statistics.median(seconds[n]):.2f} | {rate[n]:.0f} | {rate[n] / (n * one):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "build": run,
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "command": "python bench/scaleout.py " + shlex.join(sys.argv[1:]), "requests": len(requests),
        "seconds": seconds, "jobs_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
