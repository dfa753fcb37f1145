"""``rerankq serve`` against infinity-emb's ``/rerank``, over HTTP, same model, same client, side by side.

Both get the same Cohere-shaped body from the same 64-thread HTTP client; rerankq serve runs in front of
one rerankq worker on the same device. Saturation: every request sent at once, pairs/s (median of
``--repeats``); latency: an open loop at ``--rate`` requests/s, p50/p95/p99.

    python bench/serving.py --infinity /opt/infinity/bin/infinity_emb
    python bench/serving.py --infinity ... --model bge-reranker-v2-m3 --device cuda:0 --requests 400 --rate 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import provenance
from bench.peers import cell, machine, open_loop, percentiles, saturate
from bench.systems import Completions, infinity_system, serve_system
from bench.workload import add_arguments, pairs, shape, workload
from tests.tiny_models import MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infinity", required=True, help="the infinity_emb command (a venv of its own)")
    parser.add_argument("--model", choices=MODELS, default="minilm")
    parser.add_argument("--device", default="cpu")
    add_arguments(parser)
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s of the latency run")
    parser.add_argument("--baseline", default="", help="also run rerankq serve as of this git commit, side by side")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    run = provenance.describe()  # the build as the run starts

    from rerankq.redis_server import RedisServer

    requests = workload(seed=args.seed, requests=args.requests, **shape(args))
    light = workload(seed=args.seed + 1, requests=args.latency_requests, **shape(args))
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        logdir = Path(tmp)
        model = str(build_model(args.model, logdir / args.model))
        completions = Completions(server.url)
        systems = [serve_system(server.url, model, args.device, logdir, completions),
                   infinity_system(args.infinity, model, args.device, logdir, completions)]
        if args.baseline:
            systems.append(serve_system(server.url, model, args.device, logdir, completions, args.baseline))
        try:
            for system in systems:
                saturate(system, requests[:4], completions)  # warm-up
            seconds: dict[str, list[float]] = {s.name: [] for s in systems}
            for _ in range(args.repeats):  # interleaved, so both see the same noise
                for system in systems:
                    seconds[system.name].append(saturate(system, requests, completions))
            latency = {s.name: percentiles([1000 * x for x in open_loop(s, light, args.rate, args.seed, completions)])
                       for s in systems}
        finally:
            for system in systems:
                system.stop()
    n_pairs = pairs(requests)
    pairs_per_s = {name: n_pairs / statistics.median(ts) for name, ts in seconds.items()}
    report: dict[str, Any] = {
        "date": date.today().isoformat(), "machine": machine(args.device), "model": args.model,
        "device": args.device, "command": "python bench/serving.py " + shlex.join(sys.argv[1:]),
        "requests": len(requests), "pairs": n_pairs, "seconds": seconds, "pairs_per_s": pairs_per_s,
        "rate": args.rate, "latency_ms": latency}
    print(f"{'system':<16} {'pairs/s':>8} {'vs infinity':>12}   p50 / p95 / p99 ms at {args.rate:g}/s")
    for name in seconds:
        ratio = pairs_per_s[name] / pairs_per_s["infinity-emb"]
        print(f"{name:<16} {pairs_per_s[name]:>8.1f} {ratio:>11.2f}x   {cell(latency[name])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": run, **report}, indent=2))


if __name__ == "__main__":
    main()
