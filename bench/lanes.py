"""Web traffic beside an offline bulk run, on the same workers.

One simulated GPU worker (it sleeps per forward batch, using no CPU), one fast-ranker worker and the
watchdog, all with default settings. Interactive requests (``rerank.delay`` through the router) arrive in
open-loop Poisson at ``--rate`` per second for ``--seconds``:

* alone;
* beside a bulk run (``submit_many``, 256 in flight, the bulk lane) that saturates the GPU worker;
* beside the same bulk run sent to the interactive lane: how things were before lanes;

and the bulk run alone for as long. Reported: where the interactive jobs went (cross-encoder, fast
ranker, passthrough) and their latency from scheduled arrival to result; the bulk run's pairs/s over the
window; the GPU worker's busy share with interactive traffic alone (its inference seconds over wall
time, from its metrics: seconds in forward batches); and the mean time of a forward batch of the bulk run alone.

Targets: beside a bulk run, >= 99% of interactive jobs on the cross-encoder and interactive p95 <= alone
p95 + one forward batch; bulk pairs/s beside interactive traffic >= 0.9 x bulk alone x (1 -
the interactive busy share).

    python bench/lanes.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.peers import cell, open_loop, percentiles  # noqa: E402
from bench.systems import Completions, RoutedSender, System, scrape  # noqa: E402
from bench.workload import workload  # noqa: E402
from rerankq.redis_server import free_port  # noqa: E402


class BulkRun:
    """``submit_many`` in a thread until stopped: when each result came, and its pairs."""

    def __init__(self, seed: int, docs: int, min_words: int, max_words: int, lane: str) -> None:
        self.done: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._jobs = self._generate(seed, docs, min_words, max_words)
        self._thread = threading.Thread(target=self._run, args=(lane,), daemon=True)
        self._thread.start()

    @staticmethod
    def _generate(seed: int, docs: int, min_words: int, max_words: int) -> Iterator[dict[str, Any]]:
        for block in itertools.count():
            for n, request in enumerate(workload(seed + block, 500, docs, docs, min_words, max_words)):
                yield {"id": f"{block}-{n}", "query": request.query, "docs": request.docs}

    def _run(self, lane: str) -> None:
        from rerankq.producer import submit_many
        from rerankq.tasks.records import Result

        results = submit_many(self._jobs, max_in_flight=256, lane=lane)
        for _id, outcome in results:
            if isinstance(outcome, Result):
                self.done.append((time.perf_counter(), len(outcome.scores)))
            if self._stop.is_set():
                results.close()  # the jobs in flight finish unread
                return

    def pairs_per_s(self, start: float, end: float) -> float:
        return sum(n for at, n in self.done if start <= at < end) / (end - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=4.0, help="interactive requests/s")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--model", default="latency_ms=10,token_us=5", help="the simulated GPU's costs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lanes.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts


    from rerankq.celeryconfig import Settings
    from rerankq.local import RerankqProcess, WorkerProcess
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app
    from rerankq.tasks.connections import BrokerRedis
    from rerankq.worker.backlog import measure

    requests = workload(args.seed, int(args.rate * args.seconds), args.docs, args.docs, args.min_words,
                        args.max_words)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logs = Path(tmp)
        app.conf.update(broker_url=server.url, result_backend=server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url}
        settings = Settings.from_env(env)
        completions = Completions(server.url)
        broker = BrokerRedis(app)
        sender = RoutedSender(completions)

        def interactive(name: str) -> dict[str, Any]:
            latencies = open_loop(System(name, sender.send, lambda: [], lambda: None), requests, args.rate,
                                  args.seed, completions)
            return {"latency_ms": [round(1000 * x, 1) for x in latencies], "rankers": sender.rankers()}

        def drained() -> None:
            """Wait until every queue is empty and nothing is held, so that runs do not overlap."""
            while True:
                loads = measure(broker, [settings.gpu_queue, settings.gpu_queue + settings.bulk_suffix,
                                         settings.cpu_queue], settings.poll_ms / 1000).loads.values()
                if not any(load.backlog for load in loads):
                    time.sleep(3)  # the watchdog's route back to the GPU, the throughput window refreshed
                    return
                time.sleep(0.5)

        port = free_port()
        gpu = WorkerProcess("rerank.gpu", ["--ranker", "simulated", "--model", args.model, "--device", "cuda:0",
                                           "--loglevel", "WARNING", "--metrics-port", str(port)],
                            env, logs / "gpu.log", f"gpu-{os.getpid()}@bench")
        cpu = WorkerProcess("rerank.cpu", ["--ranker", "fast", "--loglevel", "WARNING"], env, logs / "cpu.log",
                            f"cpu-{os.getpid()}@bench")
        watchdog = RerankqProcess(["watchdog", "--loglevel", "WARNING"], env, logs / "watchdog.log")
        runs: dict[str, dict[str, Any]] = {}
        try:
            gpu.wait_ready(app)
            cpu.wait_ready(app)
            time.sleep(3)  # the watchdog's first polls
            interactive("warm-up")  # both workers measure their throughput

            busy_before, start = scrape(port, "rerankq_busy_seconds_total"), time.perf_counter()
            runs["interactive alone"] = interactive("interactive alone")
            busy_share = (scrape(port, "rerankq_busy_seconds_total") - busy_before) / (time.perf_counter() - start)

            for name, lane in (("beside a bulk run", "bulk"), ("beside a bulk run sent interactive", "interactive"),
                               ("bulk run alone", None)):
                bulk = BulkRun(args.seed + 1000, args.docs, args.min_words, args.max_words, lane or "bulk")
                time.sleep(5)  # the bulk run saturates the worker
                start = time.perf_counter()
                busy, batches = (scrape(port, m) for m in ("rerankq_busy_seconds_total",
                                                           "rerankq_forward_batch_pairs_count"))
                if lane is None:
                    time.sleep(args.seconds)
                    runs[name] = {}
                else:
                    runs[name] = interactive(name)
                end = time.perf_counter()
                bulk.stop()
                runs[name]["bulk_pairs_per_s"] = round(bulk.pairs_per_s(start, end), 1)
                batches = scrape(port, "rerankq_forward_batch_pairs_count") - batches
                runs[name]["forward_batch_ms"] = round(
                    1000 * (scrape(port, "rerankq_busy_seconds_total") - busy) / max(1.0, batches), 1)
                drained()
        finally:
            for process in (gpu, cpu, watchdog):
                process.stop()
            broker.close()

    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "command": "python bench/lanes.py " + shlex.join(sys.argv[1:]), "rate": args.rate,
              "requests": len(requests), "busy_share_alone": round(busy_share, 3), "runs": runs}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": run, **report}))


def print_report(report: dict[str, Any]) -> None:
    runs = report["runs"]
    batch_ms = runs["bulk run alone"]["forward_batch_ms"]
    alone_bulk = runs["bulk run alone"]["bulk_pairs_per_s"]
    print(f"\n{report['requests']} interactive requests at {report['rate']:g}/s; GPU worker busy "
          f"{100 * report['busy_share_alone']:.0f}% with them alone; a forward batch of the bulk run alone: "
          f"{batch_ms:.0f} ms (mean)\n")
    print("| run | interactive on the cross-encoder / fast / passthrough | interactive p50 / p95 / p99 ms "
          "| bulk pairs/s |")
    print("| --- | --- | --- | --- |")
    for name, run in runs.items():
        if "rankers" in run:
            count = Counter(run["rankers"])
            shares = " / ".join(f"{100 * count[kind] / len(run['rankers']):.1f}%"
                                for kind in ("simulated", "fast", "passthrough"))
            latency = cell(percentiles(run["latency_ms"]))
        else:
            shares = latency = "-"
        bulk = f"{run['bulk_pairs_per_s']:.0f}" if "bulk_pairs_per_s" in run else "-"
        print(f"| {name} | {shares} | {latency} | {bulk} |")
    beside = runs["beside a bulk run"]
    on_ce = Counter(beside["rankers"])["simulated"] / len(beside["rankers"])
    p95_alone = percentiles(runs["interactive alone"]["latency_ms"])["p95"]
    p95_beside = percentiles(beside["latency_ms"])["p95"]
    floor = 0.9 * alone_bulk * (1 - report["busy_share_alone"])
    print(f"\nbeside a bulk run: {100 * on_ce:.1f}% on the cross-encoder (target >= 99%); p95 {p95_beside:.0f} ms "
          f"against alone {p95_alone:.0f} + a forward batch {batch_ms:.0f} = {p95_alone + batch_ms:.0f} ms; bulk "
          f"{beside['bulk_pairs_per_s']:.0f} pairs/s against 0.9 x {alone_bulk:.0f} x "
          f"(1 - {report['busy_share_alone']:.2f}) = {floor:.0f}")


if __name__ == "__main__":
    main()
