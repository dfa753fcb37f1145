"""rerankq against its peers, side by side in one run: same machine, same model, same seeded workload.

Systems: bare ``CrossEncoder.predict`` over all pairs (the in-process ceiling), naive Celery (one task and
one ``predict`` per request), celery-batches, infinity-emb's ``/rerank`` server (with ``--infinity``, the
path of its ``infinity_emb`` command, installed in a venv of its own) and rerankq (one worker, defaults;
with ``--baseline REF`` also a worker of the build of git commit REF, for before/after figures).

Figures: pairs/s at saturation (every request sent at once; median of ``--repeats``, systems alternating),
latency percentiles of requests sent one at a time (none waits for another: the light-load case) and
under open-loop Poisson arrivals at each ``--loads`` (requests/s), padding
efficiency, worker RSS. ``--zero-cost`` swaps every model for one that costs nothing (rerankq's simulated
ranker at zero cost, the peers returning zeros): jobs/s is then pure queue overhead.

Models (``--model``): a MiniLM cross-encoder (the cost of ms-marco-MiniLM-L-6-v2), or one of
bge-reranker-v2-m3's shape (``bge-reranker-v2-m3``: XLM-RoBERTa-large, random weights) for a GPU
(``--device cuda:0``: every system in fp16); ``xlmr-tiny`` checks that command end to end on any machine.

    python bench/peers.py --infinity /opt/infinity/bin/infinity_emb
    python bench/peers.py --zero-cost --requests 6000 --max-docs 10 --max-words 20 --loads ""
    python bench/peers.py --model bge-reranker-v2-m3 --device cuda:0 --requests 400 --infinity ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.systems import Completions, System, celery_peer, infinity_system, rerankq_system, scrape  # noqa: E402
from bench.workload import Request, add_arguments, pairs, shape, workload  # noqa: E402
from rerankq.redis_server import free_port  # noqa: E402
from tests.tiny_models import MODELS, build_model  # noqa: E402

ZERO_COST = "latency_ms=0,token_us=0"


def saturate(system: System, requests: list[Request], completions: Completions) -> float:
    """Seconds to serve ``requests`` all waiting at once: sent while the system is paused (so that the
    sender's own speed is not what is measured), timed from its resumption."""
    system.signal(signal.SIGSTOP)
    try:
        ids = [system.send(r) for r in requests]
    finally:
        start = time.perf_counter()
        system.signal(signal.SIGCONT)
    done = completions.wait(ids)
    system.check()
    return max(done.values()) - start


def open_loop(system: System, requests: list[Request], rate: float, seed: int,
              completions: Completions) -> list[float]:
    """Latencies (s) with Poisson arrivals at ``rate``/s, each timed from its scheduled arrival."""
    rng = random.Random(seed)
    start = time.perf_counter()
    at, sent = 0.0, []
    for request in requests:
        at += rng.expovariate(rate)
        time.sleep(max(0.0, start + at - time.perf_counter()))
        sent.append((system.send(request), start + at))
    done = completions.wait([i for i, _ in sent])
    system.check()
    return [done[i] - t for i, t in sent]


def one_at_a_time(system: System, requests: list[Request], completions: Completions) -> list[float]:
    """Latencies (s) of requests sent one after another's result (and a pause): no request ever waits
    for another, so what is left over a bare ``predict`` of the same request is the system's own cost."""
    latencies = []
    for request in requests:
        start = time.perf_counter()
        task_id = system.send(request)
        latencies.append(completions.wait([task_id])[task_id] - start)
        time.sleep(0.05)
    system.check()
    return latencies


def bare_predict(model: str, device: str, saturation: dict[str, int], light: dict[str, int],
                 dtype: str = "") -> dict[str, Any]:
    """``bench/bare.py`` in a process of its own, as the workers are: nothing else shares its threads."""
    spec = json.dumps({"device": device, "saturation": saturation, "light": light, "dtype": dtype})
    run = subprocess.run([sys.executable, "-m", "bench.bare", model, spec], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def tokens(metrics_port: int) -> tuple[float, float]:
    """rerankq's real and padded tokens so far."""
    return (scrape(metrics_port, "rerankq_real_tokens_total"), scrape(metrics_port, "rerankq_padded_tokens_total"))


def share(start: tuple[float, float], end: tuple[float, float]) -> float | None:
    """Real over padded tokens between two ``tokens`` readings."""
    padded = end[1] - start[1]
    return (end[0] - start[0]) / padded if padded else None


def machine(device: str) -> str:
    cpus = f"{platform.machine()}, {os.cpu_count()} cpus"
    if not device.startswith("cuda"):
        return cpus
    import torch

    return f"{cpus}, {torch.cuda.get_device_name(torch.device(device))}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99)}


def cell(p: dict[str, float]) -> str:
    """A table cell of ``percentiles``: p50 / p95 / p99."""
    return f"{p['p50']:.0f} / {p['p95']:.0f} / {p['p99']:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--loads", default="0.5,2", help="offered loads for the latency runs, requests/s")
    parser.add_argument("--model", choices=MODELS, default="minilm")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:N (fp16)")
    parser.add_argument("--backend", default="torch", help="rerankq's RERANKQ_BACKEND (the peers run torch)")
    parser.add_argument("--bare-dtypes", default="",
                        help="also time bare predict in these dtypes (e.g. bf16: a row 'bare predict bf16')")
    parser.add_argument("--infinity", help="the infinity_emb command (omit to leave infinity-emb out)")
    parser.add_argument("--zero-cost", action="store_true")
    parser.add_argument("--baseline", default="", help="also run rerankq as of this git commit, side by side")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / ("overhead.json" if args.zero_cost else "peers.json")
    run = provenance.describe()  # the build as the run starts

    from rerankq.redis_server import RedisServer

    saturation_spec = {"seed": args.seed, "requests": args.requests, **shape(args)}
    light_spec = {"seed": args.seed + 1, "requests": args.latency_requests, **shape(args)}
    requests, light = workload(**saturation_spec), workload(**light_spec)
    loads = [float(x) for x in args.loads.split(",") if x]
    n_pairs = pairs(requests)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logdir = Path(tmp)
        model = str(build_model(args.model, logdir / args.model))
        completions = Completions(server.url)
        metrics_port = free_port()
        peer_model = "zero" if args.zero_cost else model
        worker_args = ("--ranker", "simulated", "--model", ZERO_COST) if args.zero_cost else ("--device", args.device)
        systems = [
            celery_peer("naive Celery", "peers.naive", server.url, peer_model, args.device, logdir, prefetch=1),
            celery_peer("celery-batches", "peers.batched", server.url, peer_model, args.device, logdir,
                        prefetch=128),
            rerankq_system(server.url, model, logdir, metrics_port, worker_args, args.backend),
        ]
        if args.baseline:
            systems.append(rerankq_system(server.url, model, logdir, free_port(), worker_args, args.backend,
                                          baseline=args.baseline))
        if args.infinity and not args.zero_cost:
            systems.insert(2, infinity_system(args.infinity, model, args.device, logdir, completions))
        try:
            for system in systems:  # warm-up
                saturate(system, requests[:4], completions)
            seconds: dict[str, list[float]] = {s.name: [] for s in systems}
            bare: dict[str, Any] = {}
            bare_in: dict[str, dict[str, Any]] = {}  # the bare runs in each other dtype, the last repeat's
            bare_dtypes = [d for d in args.bare_dtypes.split(",") if d]
            if not args.zero_cost:
                # "forward alone": the model's forward over the pairs tokenised beforehand, in batches sorted by
                # length (bench/bare.py): the floor of any server of this model on this machine.
                seconds = {"bare predict": [], **{f"bare predict {d}": [] for d in bare_dtypes}, "forward alone": [],
                           **{f"forward alone {d}": [] for d in bare_dtypes}, **seconds}
            # Padding of the saturation runs alone: the latency runs' jobs come one at a time, each a batch of its own.
            before = tokens(metrics_port)
            for repeat in range(args.repeats):
                if not args.zero_cost:
                    bare = bare_predict(model, args.device, saturation_spec, light_spec)
                    seconds["bare predict"].append(bare["saturation_s"])
                    seconds["forward alone"].append(bare["forward_s"])
                    for dtype in bare_dtypes:
                        other = bare_in[dtype] = bare_predict(model, args.device, saturation_spec, light_spec, dtype)
                        seconds[f"bare predict {dtype}"].append(other["saturation_s"])
                        seconds[f"forward alone {dtype}"].append(other["forward_s"])
                # Each repeat starts one system later: the slot a system runs in moved its time by ~8% (a run of
                # one build against itself, BENCHMARKS.md), so over the repeats every system takes every slot.
                shift = repeat % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    seconds[system.name].append(saturate(system, requests, completions))
            saturated = tokens(metrics_port)
            rss = {s.name: round(s.rss_mb()) for s in systems}
            latency: dict[str, dict[str, dict[str, float]]] = {}
            if loads:
                for system in systems:
                    ms = [1000 * x for x in one_at_a_time(system, light, completions)]
                    latency.setdefault(system.name, {})["one at a time"] = percentiles(ms)
            for rate in loads:
                for system in systems:
                    ms = [1000 * x for x in open_loop(system, light, rate, args.seed, completions)]
                    latency.setdefault(system.name, {})[f"{rate:g}/s"] = percentiles(ms)
            after = tokens(metrics_port)
        finally:
            for system in systems:
                system.stop()

    median = {name: statistics.median(ts) for name, ts in seconds.items()}
    report: dict[str, Any] = {
        "build": run, "rerankq_dtype": os.environ.get("RERANKQ_DTYPE", "auto"),
        "date": date.today().isoformat(), "machine": machine(args.device), "model": args.model,
        "device": args.device,
        "command": "python bench/peers.py " + shlex.join(sys.argv[1:]), "requests": len(requests),
        "pairs": n_pairs, "seconds": seconds, "jobs_per_s": {k: len(requests) / v for k, v in median.items()},
        "pairs_per_s": {k: n_pairs / v for k, v in median.items()}, "rss_mb": rss, "latency_ms": latency,
        "padding_efficiency": {"rerankq": share(before, saturated),
                               "rerankq latency runs": share(saturated, after) if loads else None}}
    if bare:
        report["padding_efficiency"]["bare predict"] = bare["padding"]
        report["padding_efficiency"]["forward alone"] = bare.get("forward_padding")
        if loads:
            # One request at a time, bare, in fp32 and in each other dtype: rerankq runs in its RERANKQ_DTYPE and
            # the peers in fp32, so a bare row in rerankq's dtype is the like-for-like floor.
            report["latency_ms"] = {"bare predict": {"one at a time": percentiles(bare["single_ms"])},
                                    **{f"bare predict {dtype}": {"one at a time": percentiles(other["single_ms"])}
                                       for dtype, other in bare_in.items()}, **latency}
        report["bare_single_request_ms_p50"] = statistics.median(bare["single_ms"])
    print_report(report, args.zero_cost)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def print_report(report: dict[str, Any], zero_cost: bool) -> None:
    rate = report["jobs_per_s" if zero_cost else "pairs_per_s"]
    unit = "jobs/s" if zero_cost else "pairs/s"
    bases = ["celery-batches"] if zero_cost else ["bare predict", "naive Celery"]
    print(f"\n{report['requests']} requests, {report['pairs']} pairs; medians of the saturation runs\n")
    print(f"| system | median s | {unit} | " + " | ".join(f"vs {b}" for b in bases) + " | worker RSS MB |")
    print("| --- | --- | --- |" + " --- |" * len(bases) + " --- |")
    for name, seconds in report["seconds"].items():
        ratios = " | ".join(f"{rate[name] / rate[b]:.2f}x" for b in bases)
        print(f"| {name} | {statistics.median(seconds):.2f} | {rate[name]:.0f} | {ratios} | "
              f"{report['rss_mb'].get(name, '-')} |")
    if report["latency_ms"]:
        loads = list(report["latency_ms"]["rerankq"])
        print("\n| system | " + " | ".join(f"{load} p50 / p95 / p99 ms" for load in loads) + " |")
        print("| --- |" + " --- |" * len(loads))
        for name, by_load in report["latency_ms"].items():
            cells = [cell(by_load[load]) if load in by_load else "-" for load in loads]
            print(f"| {name} | " + " | ".join(cells) + " |")
    if "bare_single_request_ms_p50" in report:
        print(f"\nbare predict of one request, median: {report['bare_single_request_ms_p50']:.0f} ms")
    print("padding efficiency (real / padded tokens):",
          {k: round(v, 3) for k, v in report["padding_efficiency"].items() if v})


if __name__ == "__main__":
    main()
