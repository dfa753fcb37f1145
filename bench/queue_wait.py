"""Queue wait and device busy ratio against offered load: the write-up's targets (queue-wait p95 under
20 ms with the device busy over 60% of the time).

One worker with the simulated GPU ranker (it sleeps per forward batch, using no CPU; by default the cost
of a bge-reranker-v2-m3-sized model on a mid-range GPU: 4 ms per forward batch plus 10 µs per padded
token), default settings. Its capacity is measured first (every job sent while it is paused); then jobs
of ``--docs`` docs arrive in open-loop Poisson at each ``--loads`` share of it for ``--seconds``.
Reported per load: queue wait p50/p95 (the worker's own figure: the producer's send to the job's first
forward batch), latency p50/p95 (the job's scheduled arrival to its result reaching the client), and the
busy ratio (seconds in forward batches over wall time, from the worker's ``rerankq_busy_seconds_total``).

``--baseline REF`` runs a second worker from that git commit (its code extracted to a temporary
directory) side by side in the same run: same arrivals, loads taken as shares of the baseline's capacity,
the builds taking turns at each load; ``--variant NAME=VALUE`` adds a worker of this build with that
setting. With ``--repeats``, each figure is the median over the repeats.

    python bench/queue_wait.py --baseline e763ad0 --variant RERANKQ_TARGET_BATCH_MS=0 --repeats 3
    python bench/queue_wait.py --real bge-reranker-v2-m3 --device cuda:0 --baseline e763ad0   # on a GPU
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

from bench import provenance  # noqa: E402
from bench.peers import open_loop, percentile, saturate  # noqa: E402
from bench.systems import Completions, System, checkout, scrape  # noqa: E402
from bench.workload import Request, workload  # noqa: E402
from rerankq.redis_server import free_port  # noqa: E402
from tests.tiny_models import MODELS, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default="0.3,0.6,0.8", help="shares of the measured capacity")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--model", default="latency_ms=4,token_us=10", help="the simulated GPU's costs")
    parser.add_argument("--real", choices=MODELS, help="a real cross-encoder of this shape (bench/peers.py) "
                        "on --device instead of the simulated GPU")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--capacity-requests", type=int, default=1000)
    parser.add_argument("--baseline", default="", help="a git commit to run side by side with this build")
    parser.add_argument("--variant", action="append", default=[], help="NAME=VALUE: this build with a setting")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queue_wait.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts

    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        completions = Completions(server.url)
        worker_args = ["--ranker", "simulated", "--model", args.model, "--device", args.device]
        if args.real:
            worker_args = ["--model", str(build_model(args.real, Path(tmp) / args.real)), "--device", args.device]
        builds = {"this build": Build("this build", worker_args, env, Path(tmp))}
        for variant in args.variant:
            name, _, value = variant.partition("=")
            builds[variant] = Build(variant, worker_args, {**env, name: value}, Path(tmp))
        if args.baseline:
            source = checkout(args.baseline, Path(tmp) / "baseline")
            builds = {f"baseline {args.baseline}": Build(f"baseline {args.baseline}", worker_args,
                                                         {**env, **source}, Path(tmp)), **builds}
        rows: list[dict[str, Any]] = []
        try:
            for build in builds.values():
                build.worker.wait_ready(app)
            probe = workload(args.seed + 100, args.capacity_requests, args.docs, args.docs, args.min_words,
                             args.max_words)
            capacity = {name: len(probe) / saturate(build.system, probe, completions)
                        for name, build in builds.items()}
            reference = next(iter(capacity.values()))
            for n, share in enumerate(float(x) for x in args.loads.split(",")):
                rate = share * reference
                requests = workload(args.seed + n, int(rate * args.seconds), args.docs, args.docs,
                                    args.min_words, args.max_words)
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in builds}
                for repeat in range(args.repeats):
                    order = list(builds.values())
                    if (n + repeat) % 2:
                        order.reverse()
                    for build in order:
                        runs[build.name].append(build.run(requests, rate, args.seed + n, completions))
                for name, figures in runs.items():
                    rows.append({"build": name, "load": share, "jobs_per_s": round(rate, 1),
                                 **{k: round(statistics.median(f[k] for f in figures), 3) for k in figures[0]}})
        finally:
            for build in builds.values():
                build.worker.stop()

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "command": "python bench/queue_wait.py " + shlex.join(sys.argv[1:]),
              "capacity_jobs_per_s": {name: round(c, 1) for name, c in capacity.items()}, "rows": rows}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": run, **report}))


class Build:
    """A worker of one build of rerankq: this checkout, or another commit's code (``env`` from ``checkout``)."""

    def __init__(self, name: str, worker_args: list[str], env: dict[str, str], tmp: Path) -> None:
        from rerankq.local import WorkerProcess
        from rerankq.tasks import rerank

        self.name = name
        self.port = free_port()
        queue = f"rerank.gpu.{self.port}"
        self.worker = WorkerProcess(queue, [*worker_args, "--loglevel", "WARNING", "--metrics-port", str(self.port)],
                                    env, tmp / f"worker-{self.port}.log", f"gpu-{self.port}@bench")
        self.ids: list[str] = []

        def send(request: Request) -> str:
            handle = rerank.apply_async((request.query, request.docs), queue=queue)
            self.ids.append(handle.id)
            return str(handle.id)

        self.system = System(name, send, lambda: [self.worker.proc.pid], lambda: None)

    def run(self, requests: list[Request], rate: float, seed: int, completions: Completions) -> dict[str, Any]:
        from rerankq.tasks import app

        self.ids.clear()
        busy, start = scrape(self.port, "rerankq_busy_seconds_total"), time.perf_counter()
        latencies = open_loop(self.system, requests, rate, seed, completions)
        busy_ratio = (scrape(self.port, "rerankq_busy_seconds_total") - busy) / (time.perf_counter() - start)
        results = [app.backend.get_task_meta(task_id)["result"] for task_id in self.ids]
        waits = [r["timings"]["queue_ms"] for r in results]
        return {"jobs": len(results),
                "queue_wait_p50_ms": round(percentile(waits, 50), 1),
                "queue_wait_p95_ms": round(percentile(waits, 95), 1),
                "latency_p50_ms": round(1000 * percentile(latencies, 50), 1),
                "latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
                "busy_ratio": round(busy_ratio, 3)}


def print_report(report: dict[str, Any]) -> None:
    print("\ncapacity (jobs/s): " + ", ".join(f"{k} {v}" for k, v in report["capacity_jobs_per_s"].items()) + "\n")
    print("| load | jobs/s | build | queue wait p50 ms | queue wait p95 ms | latency p50 ms | latency p95 ms "
          "| busy ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in report["rows"]:
        print(f"| {100 * row['load']:.0f}% | {row['jobs_per_s']} | {row['build']} | {row['queue_wait_p50_ms']:.1f} | "
              f"{row['queue_wait_p95_ms']:.1f} | {row['latency_p50_ms']:.0f} | {row['latency_p95_ms']:.0f} | "
              f"{row['busy_ratio']:.2f} |")


if __name__ == "__main__":
    main()
