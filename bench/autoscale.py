"""Which signal should scale GPU workers: the queue's length, or the wait rerankq estimates? (issue #32)

Real workers (the simulated GPU), the watchdog, a stand-in fast ranker on the CPU queue, and producers sending
through the router with open-loop Poisson arrivals at 30% of one worker's measured capacity, then 250%, then 30%
again. A small autoscaler applies what KEDA's HPA does with the chart's ScaledObject (deploy/helm) to one of
two signals, starting and stopping worker processes as it decides:

* ``llen``: the queue's length in Redis (KEDA's redis list trigger, AverageValue: ceil(LLEN / target));
* ``wait``: ``rerankq_estimated_wait_seconds`` times the live workers, scraped from the watchdog as Prometheus
  would (the chart's query, AverageValue: ceil(workers x wait / target)).

Both with the chart's behaviour, its times divided by ``--speedup`` (10: KEDA polls every 1.5 s, scale-up
window 3 s and 2 pods per 3 s, scale-down window 30 s and one pod per 12 s) and a pod that takes
``--start-s`` to start (a GPU pod's image pull and model load). Reported per signal: seconds from the step to
enough workers, interactive latency p50/p95 during the step, the share of jobs shed to the fast ranker (or
passed through), worker-minutes used, and scale-ins of a worker that held jobs.

    python bench/autoscale.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.peers import percentiles, saturate  # noqa: E402
from bench.systems import Completions, RoutedSender, System  # noqa: E402
from bench.workload import workload  # noqa: E402
from rerankq.redis_server import free_port  # noqa: E402

#: The chart's ScaledObject as its values.yaml sets it, in KEDA's seconds (divided by --speedup here).
VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "rerankq" / "values.yaml").read_text())
KEDA = VALUES["workers"][0]["autoscaling"]["keda"]
POLL_S = float(KEDA["pollingSeconds"])
STEP = ("stabilizationSeconds", "pods", "periodSeconds")
UP_WINDOW_S, UP_PODS, UP_PERIOD_S = (int(KEDA["scaleUp"][k]) for k in STEP)
DOWN_WINDOW_S, DOWN_PODS, DOWN_PERIOD_S = (int(KEDA["scaleDown"][k]) for k in STEP)
LIST_TARGET = float(KEDA["list"]["length"])
FAST_MODEL = "latency_ms=5,token_us=1"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r'^(rerankq_\w+)(?:\{queue="([^"]*)"\})? (\S+)$', line)
        if match:
            found[f"{match[1]}{{{match[2]}}}" if match[2] else match[1]] = float(match[3])
    return found


@dataclass
class Pod:
    worker: Any | None
    port: int
    ready_at: float


@dataclass
class Fleet:
    """Worker processes as Deployment replicas: a pod counts from its creation, serves once started."""

    env: dict[str, str]
    model: str
    logs: Path
    start_s: float
    pods: list[Pod] = field(default_factory=list)
    busy_scale_ins: int = 0
    scale_ins: int = 0
    #: Jobs the workers scaled in held (put back on their queue by the warm shutdown).
    put_back: int = 0

    def scale_to(self, n: int, now: float) -> None:
        from rerankq.local import WorkerProcess

        while len(self.pods) < n:
            port = free_port()
            self.pods.append(Pod(None, port, now + self.start_s))
        while len(self.pods) > n:
            pod = self.pods.pop()  # the newest, as a ReplicaSet picks the youngest pod
            self.scale_ins += 1
            if pod.worker is not None:
                try:
                    held = scrape(pod.port).get("rerankq_jobs_held", 0.0)
                except OSError:
                    held = 0.0
                self.busy_scale_ins += held > 0
                self.put_back += int(held)
                pod.worker.stop(timeout=60)  # a warm shutdown: the running batch ends, the rest goes back
        for pod in self.pods:
            if pod.worker is None and now >= pod.ready_at:
                name = f"w{pod.port}-{os.getpid()}@bench"
                pod.worker = WorkerProcess("rerank.gpu", ["--ranker", "simulated", "--model", self.model, "--device",
                                                          "cuda:0", "--metrics-port", str(pod.port), "--loglevel",
                                                          "WARNING"], self.env, self.logs / f"{name}.log", name)

    def serving(self) -> int:
        return sum(1 for pod in self.pods if pod.worker is not None)

    def stop(self) -> None:
        for pod in self.pods:
            if pod.worker is not None:
                pod.worker.stop()
        self.pods.clear()


class Hpa:
    """The HPA's decision as KEDA configures it: the desired count from the metric, the scale-up (down)
    recommendation the lowest (highest) of the stabilisation window, at most so many pods per period."""

    def __init__(self, speedup: float, lo: int, hi: int) -> None:
        self.up_window, self.down_window = UP_WINDOW_S / speedup, DOWN_WINDOW_S / speedup
        self.up_period, self.down_period = UP_PERIOD_S / speedup, DOWN_PERIOD_S / speedup
        self.lo, self.hi = lo, hi
        self.history: deque[tuple[float, int]] = deque()
        self.changes: deque[tuple[float, int]] = deque()  # (when, pods added (+) or removed (-))

    def decide(self, now: float, current: int, desired: int) -> int:
        desired = max(self.lo, min(self.hi, desired))
        self.history.append((now, desired))
        while self.history and self.history[0][0] < now - self.down_window:
            self.history.popleft()
        if desired > current:
            target = min(d for t, d in self.history if t >= now - self.up_window)
            added = sum(c for t, c in self.changes if c > 0 and t >= now - self.up_period)
            target = min(max(target, current), current + max(0, UP_PODS - added))
        else:
            target = max(d for t, d in self.history)
            removed = -sum(c for t, c in self.changes if c < 0 and t >= now - self.down_period)
            target = max(min(target, current), current - max(0, DOWN_PODS - removed))
        if target != current:
            self.changes.append((now, target - current))
        return target


def run(signal: str, args: argparse.Namespace, capacity: float, env: dict[str, str], logs: Path,
        watchdog_port: int, completions: Completions, broker: Any) -> dict[str, Any]:
    from rerankq.tasks import app
    from rerankq.tasks.records import Result

    fleet = Fleet(env, args.model, logs, args.start_s)
    hpa = Hpa(args.speedup, 1, args.max_workers)
    fleet.pods.append(Pod(None, free_port(), 0.0))  # one worker, up from the start
    fleet.scale_to(1, time.monotonic())
    first = fleet.pods[0].worker
    assert first is not None
    first.wait_ready(app)
    phases = [("low", args.low_s, 0.3), ("step", args.high_s, 2.5), ("after", args.after_s, 0.3)]
    rng = random.Random(args.seed)
    arrivals: list[tuple[float, str]] = []  # offset from the start, phase
    offset = 0.0
    for name, seconds, share in phases:
        end = offset + seconds
        while (offset := offset + rng.expovariate(share * capacity)) < end:
            arrivals.append((offset, name))
        offset = end
    requests = workload(args.seed, len(arrivals), 1, args.max_docs, 5, args.max_words)
    sender = RoutedSender(completions)
    sent: list[tuple[str, float, str]] = []
    timeline: list[dict[str, float]] = []
    stop = threading.Event()
    began, began_pc = time.monotonic(), time.perf_counter()  # Completions stamps with perf_counter
    step_at = began + args.low_s
    enough_at: list[float] = []

    def autoscale() -> None:
        while not stop.wait(POLL_S / args.speedup):
            now = time.monotonic()
            try:
                if signal == "llen":
                    metric = float(broker.llen(env["RERANKQ_GPU_QUEUE"])) / LIST_TARGET
                else:
                    figures = scrape(watchdog_port)
                    wait = figures.get(f"rerankq_estimated_wait_seconds{{{env['RERANKQ_GPU_QUEUE']}}}", math.nan)
                    live = figures.get(f"rerankq_live_workers{{{env['RERANKQ_GPU_QUEUE']}}}", 0.0)
                    metric = min(wait, 3600.0) * max(live, 1.0) / args.wait_target if wait >= 0 else 0.0
            except OSError:
                continue  # the metric unreadable: KEDA keeps the replicas (then falls back)
            current = len(fleet.pods)
            fleet.scale_to(hpa.decide(now, current, math.ceil(metric)), now)
            serving = fleet.serving()
            if now >= step_at and serving >= math.ceil(2.5) and not enough_at:
                enough_at.append(now - step_at)
            timeline.append({"t": round(now - began, 2), "metric": round(metric, 3), "pods": len(fleet.pods),
                             "serving": serving})

    scaler = threading.Thread(target=autoscale, daemon=True)
    scaler.start()
    try:
        for (at, phase), request in zip(arrivals, requests, strict=True):
            time.sleep(max(0.0, began_pc + at - time.perf_counter()))
            sent.append((sender.send(request), began_pc + at, phase))
        done = completions.wait([task_id for task_id, _, _ in sent], timeout=600)
    finally:
        stop.set()
        scaler.join()
        fleet_minutes = _pod_minutes(timeline)
        busy, scale_ins, put_back = fleet.busy_scale_ins, fleet.scale_ins, fleet.put_back
        fleet.stop()
    served: Counter[str] = Counter()
    step_ms: list[float] = []
    for task_id, at, phase in sent:
        result = Result.from_dict(sender.sent.get(task_id) or app.backend.get_task_meta(task_id)["result"])
        where = "gpu" if result.ranker == "simulated" and result.model == args.model else (
            "passthrough" if result.ranker == "passthrough" else "fast")
        served[where] += 1
        if phase == "step" and where == "gpu":
            step_ms.append(1000 * (done[task_id] - at))
    return {"signal": signal, "jobs": len(sent), "served": dict(served),
            "shed_share": round(1 - served["gpu"] / len(sent), 4),
            "seconds_to_enough_workers": round(enough_at[0], 1) if enough_at else None,
            "step_gpu_latency_ms": percentiles(step_ms) if step_ms else None,
            "worker_minutes": round(fleet_minutes, 2), "scale_ins": scale_ins, "busy_scale_ins": busy,
            "jobs_put_back_by_scale_ins": put_back,
            "timeline": timeline}


def _pod_minutes(timeline: list[dict[str, float]]) -> float:
    return sum((b["t"] - a["t"]) * a["pods"] for a, b in itertools.pairwise(timeline)) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="latency_ms=200,token_us=60", help="the simulated GPU's costs")
    parser.add_argument("--speedup", type=float, default=10.0, help="KEDA's and the HPA's times divided by this")
    parser.add_argument("--start-s", type=float, default=6.0, help="seconds a new worker pod takes to start")
    parser.add_argument("--low-s", type=float, default=20.0)
    parser.add_argument("--high-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, default=60.0)
    parser.add_argument("--max-workers", type=int, default=6)
    parser.add_argument("--max-docs", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--signals", default="llen,wait")
    # The chart's 0.3 s target lies above a job's wait at light load on a GPU (a 15 ms batch or two) and below the
    # watchdog's 0.5 s low mark. The simulated GPU's batches are ~13x longer (so that this machine can send 250% of
    # a worker's jobs): the target and the marks are scaled to keep that order.
    parser.add_argument("--wait-target", type=float, default=1.0, help="the wait trigger's target, seconds")
    parser.add_argument("--marks", default="1.5,4", help="the watchdog's low and high marks, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "autoscale.json")
    args = parser.parse_args()
    build = provenance.describe()

    import redis

    from rerankq.local import RerankqProcess, WorkerProcess
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app

    results = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logs = Path(tmp)
        app.conf.update(broker_url=server.url, result_backend=server.url)
        env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url,
               "RERANKQ_GPU_QUEUE": "rerank.gpu", "RERANKQ_CPU_QUEUE": "rerank.cpu"}
        completions = Completions(server.url)
        broker = redis.Redis.from_url(server.url)
        fast = WorkerProcess("rerank.cpu", ["--ranker", "simulated", "--model", FAST_MODEL, "--metrics-port", "0",
                                            "--loglevel", "WARNING"], env, logs / "fast.log",
                             f"fast-{os.getpid()}@bench")
        probe_worker = WorkerProcess("rerank.gpu", ["--ranker", "simulated", "--model", args.model, "--device",
                                                    "cuda:0", "--metrics-port", "0", "--loglevel", "WARNING"], env,
                                     logs / "probe.log", f"probe-{os.getpid()}@bench")
        watchdog: RerankqProcess | None = None
        try:
            fast.wait_ready(app)
            probe_worker.wait_ready(app)
            probe = workload(args.seed + 100, 300, 1, args.max_docs, 5, args.max_words)
            sender = RoutedSender(completions)
            system = System("probe", sender.send, lambda: [probe_worker.proc.pid], lambda: None)
            saturate(system, probe[:100], completions)  # the batch-cost fit settles first
            capacity = 200 / saturate(system, probe[100:], completions)
            probe_worker.stop()
            print(f"one worker serves {capacity:.1f} jobs/s", flush=True)
            # Started after the probe, which is no load to shed.
            watchdog_port = free_port()
            low, high = args.marks.split(",")
            watchdog = RerankqProcess(["watchdog", "--metrics-port", str(watchdog_port), "--loglevel", "WARNING"],
                                      {**env, "RERANKQ_LOW_WAIT_S": low, "RERANKQ_HIGH_WAIT_S": high},
                                      logs / "watchdog.log")
            for signal in args.signals.split(","):
                time.sleep(5)  # the watchdog forgets the last run's workers
                results.append(run(signal, args, capacity, env, logs, watchdog_port, completions, broker))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "timeline"}), flush=True)
        finally:
            for process in (fast, watchdog):
                if process is not None:
                    process.stop()
    report = {"build": build, "capacity_jobs_per_s": capacity, "runs": results,
              "settings": {"speedup": args.speedup, "start_s": args.start_s, "wait_target_s": args.wait_target,
                           "marks_s": args.marks, "list_target": LIST_TARGET,
                           "phases_s": [args.low_s, args.high_s, args.after_s]}}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report))


def print_report(report: dict[str, Any]) -> None:
    print(f"\none worker: {report['capacity_jobs_per_s']:.1f} jobs/s; load 30% -> 250% -> 30% of it\n")
    print("| signal | s to enough workers | step GPU jobs p50 / p95 ms | shed | worker-minutes | scale-ins "
          "(of a worker holding jobs; jobs put back) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        latency = r["step_gpu_latency_ms"] or {}
        print(f"| {r['signal']} | {r['seconds_to_enough_workers']} | {latency.get('p50', 0):.0f} / "
              f"{latency.get('p95', 0):.0f} | {100 * r['shed_share']:.0f}% | {r['worker_minutes']} | "
              f"{r['scale_ins']} ({r['busy_scale_ins']}; {r['jobs_put_back_by_scale_ins']}) |")


if __name__ == "__main__":
    main()
