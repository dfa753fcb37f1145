"""The fast ranker's capacity, fp32 against the default dtype (issue #34): jobs/s one fast-ranker worker (the bundled
all-MiniLM-L6-v2 bi-encoder on the CPU) serves with every job waiting, with ``RERANKQ_DTYPE=fp32`` and with
``auto`` (bf16 on a CPU that computes it natively), side by side, the order rotated per repeat.

    python bench/fast_capacity.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import provenance  # noqa: E402
from bench.peers import saturate  # noqa: E402
from bench.systems import Completions, System  # noqa: E402
from bench.workload import Request, workload  # noqa: E402

if TYPE_CHECKING:
    from rerankq.local import WorkerProcess

DTYPES = ("fp32", "auto")


def _system(name: str, send: Callable[[Request], str], worker: WorkerProcess) -> System:
    def stop() -> None:
        worker.stop()

    return System(name, send, lambda: [worker.proc.pid], stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-docs", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fast_capacity.json")
    args = parser.parse_args()
    build = provenance.describe()

    from rerankq.local import WorkerProcess
    from rerankq.redis_server import RedisServer
    from rerankq.tasks import app, rerank

    requests = workload(args.seed, args.requests, 1, args.max_docs, 5, args.max_words)
    seconds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url)
        completions = Completions(server.url)
        systems = []
        for dtype in DTYPES:
            queue = f"bench.fast.{dtype}"
            env = {"RERANKQ_BROKER_URL": server.url, "RERANKQ_RESULT_BACKEND": server.url, "RERANKQ_DTYPE": dtype}
            worker = WorkerProcess(queue, ["--ranker", "fast", "--queue", queue, "--metrics-port", "0", "--loglevel",
                                           "WARNING"], env, Path(tmp) / f"{dtype}.log",
                                   f"fast-{dtype}-{os.getpid()}@bench")
            worker.wait_ready(app)

            def send(request: Request, queue: str = queue) -> str:
                return str(rerank.apply_async((request.query, request.docs), queue=queue).id)

            systems.append(_system(dtype, send, worker))
        try:
            for system in systems:
                saturate(system, requests[:20], completions)  # warm-up
            for repeat in range(args.repeats):
                shift = repeat % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    seconds[system.name].append(saturate(system, requests, completions))
        finally:
            for system in systems:
                system.stop()
    jobs_per_s = {dtype: len(requests) / statistics.median(s) for dtype, s in seconds.items()}
    print(f"\n{len(requests)} requests, {sum(len(r.docs) for r in requests)} pairs, medians of {args.repeats}\n")
    print("| RERANKQ_DTYPE | median s | jobs/s | vs fp32 | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for dtype in DTYPES:
        print(f"| {dtype} | {statistics.median(seconds[dtype]):.2f} | {jobs_per_s[dtype]:.1f} | "
              f"{jobs_per_s[dtype] / jobs_per_s['fp32']:.2f}x | {', '.join(f'{x:.2f}' for x in seconds[dtype])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"build": build, "requests": len(requests), "seconds": seconds,
                                    "jobs_per_s": jobs_per_s}))


if __name__ == "__main__":
    main()
