"""Queue wait and device busy ratio against offered load: the write-up's targets (queue-wait p95 under
20 ms with the device busy over 60% of the time).

One worker with the simulated GPU ranker (it sleeps per forward batch, using no CPU; by default the cost
of a bge-reranker-v2-m3-sized model on a mid-range GPU: 4 ms per forward batch plus 10 µs per padded
token), default settings. Its capacity is measured first (every job sent while it is paused); then jobs
of ``--docs`` docs arrive in open-loop Poisson at each ``--loads`` share of it for ``--seconds``.
Reported per load: queue wait p50/p95 (the workers' own figure: the producer's send to the job's first
forward batch), the chunk inference p50, and the busy ratio (seconds in forward batches over wall time,
from the worker's ``rerankq_busy_seconds_total``).

    python bench/queue_wait.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import open_loop, percentile, saturate  # noqa: E402
from bench.systems import Completions, System, scrape  # noqa: E402
from bench.workload import Request, workload  # noqa: E402
from rerankq.redis_server import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="0.3,0.6,0.8", help="shares of the measured capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--model", default="latency_ms=4,token_us=10", help="the simulated GPU's costs")
    parser.add_argument("--capacity-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label", default="", help="a name for this build in the report")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queue_wait.json")
    args = parser.parse_args()

    from rerankq.local import WorkerProcess
    from rerankq.redis_server import RedisServer
    from tasks import app, rerank

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        completions = Completions(server.url)
        port = free_port()
        worker = WorkerProcess("rerank.gpu", ["--ranker", "simulated", "--model", args.model, "--device", "cuda:0",
                                              "--loglevel", "WARNING", "--metrics-port", str(port)],
                               env, Path(tmp) / "worker.log", f"gpu-{os.getpid()}@bench")
        ids: list[str] = []

        def send(request: Request) -> str:
            handle = rerank.apply_async((request.query, request.docs), queue="rerank.gpu")
            ids.append(handle.id)
            return str(handle.id)

        system = System("rerankq", send, lambda: [worker.proc.pid], lambda: None)
        rows = []
        try:
            worker.wait_ready(app)
            probe = workload(args.seed + 100, args.capacity_requests, args.docs, args.docs, args.min_words,
                             args.max_words)
            capacity = len(probe) / saturate(system, probe, completions)
            for share in (float(x) for x in args.loads.split(",")):
                rate = share * capacity
                requests = workload(args.seed, int(rate * args.seconds), args.docs, args.docs, args.min_words,
                                    args.max_words)
                ids.clear()
                busy, start = scrape(port, "rerankq_busy_seconds_total"), time.perf_counter()
                open_loop(system, requests, rate, args.seed, completions)
                busy_ratio = (scrape(port, "rerankq_busy_seconds_total") - busy) / (time.perf_counter() - start)
                results = [app.backend.get_task_meta(task_id)["result"] for task_id in ids]
                waits = [r["timings"]["queue_ms"] for r in results]
                rows.append({"load": share, "jobs_per_s": round(rate, 1), "jobs": len(results),
                             "queue_wait_p50_ms": round(percentile(waits, 50), 1),
                             "queue_wait_p95_ms": round(percentile(waits, 95), 1),
                             "inference_p50_ms": round(statistics.median(r["timings"]["inference_ms"]
                                                                         for r in results), 1),
                             "busy_ratio": round(busy_ratio, 3)})
        finally:
            worker.stop()

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "command": "python bench/queue_wait.py " + shlex.join(sys.argv[1:]), "label": args.label,
              "capacity_jobs_per_s": round(capacity, 1), "rows": rows}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report))


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['label'] or 'this build'}: capacity {report['capacity_jobs_per_s']} jobs/s\n")
    print("| load | jobs/s | queue wait p50 ms | queue wait p95 ms | chunk inference p50 ms | busy ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in report["rows"]:
        print(f"| {100 * row['load']:.0f}% | {row['jobs_per_s']} | {row['queue_wait_p50_ms']} | "
              f"{row['queue_wait_p95_ms']} | {row['inference_p50_ms']} | {row['busy_ratio']:.2f} |")


if __name__ == "__main__":
    main()
