"""Two models on one Redis: each model's worker pool beside the other's against alone, and what naming a model
costs a request at light load.

One simulated GPU worker per model (it sleeps per forward batch, using little CPU), a watchdog judging both,
one Redis. Throughput: a bulk run of ``--jobs`` jobs (``submit_many``, 256 in flight) to ``alpha`` alone, to
``beta`` alone, and to both at once (a thread each), ``--repeats`` times with the order rotated; jobs/s per
model, and each model's together / alone ratio (medians, and the spread). Latency: ``--requests`` sequential
``rerank()`` calls at light load, alternating between the default model (no model named: the path every
call took before models had names) and ``beta`` by name; p50 / p95 of each.

Targets (issue #31): together >= 0.95 x alone for each model; the named model's p50 within noise of the
default's.

    python -m bench.two_models
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.peers import percentiles  # noqa: E402
from bench.workload import workload  # noqa: E402

MODELS = ("alpha", "beta")


def bulk_rate(model: str, jobs: list[dict[str, Any]], out: dict[str, float]) -> None:
    """Send ``jobs`` to ``model``'s bulk lane and record its jobs/s (first send to last result)."""
    from rerankq.producer import submit_many
    from rerankq.tasks.records import Result

    started = time.perf_counter()
    done = sum(isinstance(outcome, Result) for _, outcome in submit_many(jobs, max_in_flight=256, model=model))
    if done != len(jobs):
        raise RuntimeError(f"{len(jobs) - done} of {model}'s jobs failed")
    out[model] = len(jobs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs per model per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="sequential calls for the latency figures")
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--gpu", default="latency_ms=50,token_us=10", help="the simulated GPU's costs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "two-models.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts

    from rerankq import celeryconfig
    from rerankq.celeryconfig import Settings
    from rerankq.local import RerankqProcess, WorkerProcess
    from rerankq.producer import rerank
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app

    requests = workload(args.seed, args.jobs, args.docs, args.docs, 20, 60)
    jobs = [{"id": i, "query": r.query, "docs": r.docs} for i, r in enumerate(requests)]
    spec = json.dumps([{"name": "alpha", "queue": "bench.alpha"}, {"name": "beta", "queue": "bench.beta"}])
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logs = Path(tmp)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url, "RERANKQ_MODELS": spec}
        app.conf.update(broker_url=server.url, result_backend=server.url)
        celeryconfig.settings = Settings.from_env(env)
        workers = [WorkerProcess(f"bench.{name}", ["--ranker", "simulated", "--model", args.gpu, "--served-name",
                                                   name, "--loglevel", "WARNING"], env, logs / f"{name}.log",
                                 f"{name}@bench") for name in MODELS]
        watchdog = RerankqProcess(["watchdog", "--loglevel", "WARNING"], env, logs / "watchdog.log")
        alone: dict[str, list[float]] = {m: [] for m in MODELS}
        together: dict[str, list[float]] = {m: [] for m in MODELS}
        latency: dict[str, list[float]] = {"default": [], "beta by name": []}
        try:
            for worker in workers:
                worker.wait_ready(app)
            bulk_rate("alpha", jobs[:50], {})  # warm-up: both measure their speed
            bulk_rate("beta", jobs[:50], {})
            for repeat in range(args.repeats):
                phases = ["alpha", "beta", "both"]
                for phase in phases[repeat % 3:] + phases[:repeat % 3]:  # rotated: no phase always first
                    rates: dict[str, float] = {}
                    names = MODELS if phase == "both" else (phase,)
                    threads = [threading.Thread(target=bulk_rate, args=(m, jobs, rates)) for m in names]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    for m in names:
                        (together if phase == "both" else alone)[m].append(rates[m])
                    print(f"repeat {repeat + 1}, {phase}: " + ", ".join(f"{m} {rates[m]:.1f} jobs/s" for m in names),
                          flush=True)
            time.sleep(2)  # the watchdog's route back to each queue once the bulk runs' backlog is gone
            for i in range(args.requests):
                request = requests[i % len(requests)]
                for name, model in (("default", None), ("beta by name", "beta"))[::1 if i % 2 else -1]:
                    started = time.perf_counter()
                    rerank(request.query, request.docs, model=model, timeout=30)
                    latency[name].append(1000 * (time.perf_counter() - started))
                time.sleep(0.02)  # light load: one call at a time, with pauses
        finally:
            for process in (*workers, watchdog):
                process.stop()

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
                "max": round(max(values), 2)}

    report = {
        "jobs": args.jobs, "repeats": args.repeats, "simulated_gpu": args.gpu,
        "alone_jobs_per_s": {m: spread(v) for m, v in alone.items()},
        "together_jobs_per_s": {m: spread(v) for m, v in together.items()},
        "ratio": {m: spread([t / a for t, a in zip(together[m], alone[m], strict=True)]) for m in MODELS},
        "latency_ms": {name: {k: round(v, 2) for k, v in percentiles(ms).items()} for name, ms in latency.items()},
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": run, **report}, indent=1))


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['jobs']} bulk jobs per model per run, {report['repeats']} repeats, simulated GPU "
          f"{report['simulated_gpu']}\n")
    print("| model | alone jobs/s | beside the other jobs/s | together / alone (median, min-max) |")
    print("| --- | --- | --- | --- |")
    for m in MODELS:
        a, t, r = (report[k][m] for k in ("alone_jobs_per_s", "together_jobs_per_s", "ratio"))
        print(f"| {m} | {a['median']:.1f} | {t['median']:.1f} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) |")
    print("\n| call at light load | p50 ms | p95 ms |")
    print("| --- | --- | --- |")
    for name, p in report["latency_ms"].items():
        print(f"| {name} | {p['p50']:.1f} | {p['p95']:.1f} |")


if __name__ == "__main__":
    main()
