"""The backlog watchdog under overload: new jobs arrive at twice what the GPU worker serves.

One simulated GPU worker (it sleeps per forward batch, using no CPU), one CPU worker with the bundled
fast ranker, and producers sending through the router with open-loop Poisson arrivals at ``--overload``
times the GPU worker's measured capacity, for ``--seconds``. Run twice on the same arrivals: without a
watchdog (every job queues for the GPU) and with one (new jobs shed to the fast ranker, then to
passthrough, while the GPU queue's estimated wait is over its mark). Reported: where the jobs went and
their latency, from each job's scheduled arrival to its result.

    python bench/overload.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.peers import cell, open_loop, percentiles, saturate  # noqa: E402
from bench.systems import Completions, RoutedSender, System  # noqa: E402
from bench.workload import workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overload", type=float, default=2.0, help="offered load over the GPU worker's capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-docs", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--model", default="latency_ms=100,token_us=40", help="the simulated GPU's costs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts


    from rerankq.local import RerankqProcess, WorkerProcess
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logs = Path(tmp)
        app.conf.update(broker_url=server.url, result_backend=server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        completions = Completions(server.url)
        sender = RoutedSender(completions)

        gpu = WorkerProcess("rerank.gpu", ["--ranker", "simulated", "--model", args.model, "--device", "cuda:0",
                                           "--loglevel", "WARNING"], env, logs / "gpu.log", f"gpu-{os.getpid()}@bench")
        cpu = WorkerProcess("rerank.cpu", ["--ranker", "fast", "--loglevel", "WARNING"], env, logs / "cpu.log",
                            f"cpu-{os.getpid()}@bench")
        watchdog: RerankqProcess | None = None
        try:
            gpu.wait_ready(app)
            cpu.wait_ready(app)
            probe = workload(args.seed + 100, 300, 1, args.max_docs, 5, args.max_words)
            capacity = len(probe) / saturate(System("gpu", sender.send, lambda: [gpu.proc.pid], lambda: None), probe,
                                             completions)
            rate = args.overload * capacity
            sender.sent.clear()  # the probe's jobs
            requests = workload(args.seed, int(rate * args.seconds), 1, args.max_docs, 5, args.max_words)
            runs: dict[str, dict[str, Any]] = {}
            for name in ("without watchdog", "with watchdog"):
                if name == "with watchdog":
                    watchdog = RerankqProcess(["watchdog", "--loglevel", "WARNING"], env, logs / "watchdog.log")
                    time.sleep(3)  # its first polls: both queues measured, the route state written
                system = System(name, sender.send, lambda: [], lambda: None)
                latencies = open_loop(system, requests, rate, args.seed, completions)
                runs[name] = {"latency_ms": [round(1000 * x, 1) for x in latencies], "rankers": sender.rankers()}
        finally:
            for process in (gpu, cpu, watchdog):
                if process is not None:
                    process.stop()

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "command": "python bench/overload.py " + shlex.join(sys.argv[1:]), "gpu_jobs_per_s": capacity,
              "offered_jobs_per_s": rate, "requests": len(requests), "runs": runs}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": run, **report}))


def print_report(report: dict[str, Any]) -> None:
    print(f"\nGPU worker alone: {report['gpu_jobs_per_s']:.1f} jobs/s; offered {report['offered_jobs_per_s']:.1f} "
          f"jobs/s, {report['requests']} requests\n")
    print("| run | on the GPU | fast ranker | passthrough | all p50 / p95 / p99 ms | GPU jobs p50 / p95 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, run in report["runs"].items():
        count = Counter(run["rankers"])
        gpu_ms = [ms for ms, ranker in zip(run["latency_ms"], run["rankers"], strict=True) if ranker == "simulated"]
        shares = [f"{100 * count[kind] / len(run['rankers']):.0f}%" for kind in ("simulated", "fast", "passthrough")]
        print(f"| {name} | {' | '.join(shares)} | "
              f"{_cells(run['latency_ms'])} | {_cells(gpu_ms)} |")


def _cells(ms: list[float]) -> str:
    return cell(percentiles(ms)) if ms else "-"


if __name__ == "__main__":
    main()
