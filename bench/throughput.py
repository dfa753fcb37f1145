"""Saturation throughput: bare ``CrossEncoder.predict`` over all pairs vs rerankq with one worker.

Same machine, same model, same seeded workload, alternating runs; medians. The model has the cost of
cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, 6 layers, 384 wide): the bundled all-MiniLM-L6-v2 encoder
with a fresh one-score head, built offline.

    python bench/throughput.py --requests 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rerankq.local import WorkerProcess  # noqa: E402
from rerankq.redis_server import RedisServer  # noqa: E402
from tests.tiny_models import build_minilm_cross_encoder  # noqa: E402


def workload(seed: int, requests: int, max_docs: int, max_words: int) -> list[tuple[str, list[str]]]:
    sample = json.loads((ROOT / "rerankq" / "sample.json").read_text())
    words = sorted({w for s in sample for text in [s["query"], *s["docs"]] for w in text.split()})
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    return [(text(3, 12), [text(5, max_words) for _ in range(rng.randint(1, max_docs))]) for _ in range(requests)]


def run_bare(model: Path, jobs: list[tuple[str, list[str]]]) -> float:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model), device="cpu")
    pairs = [(q, d) for q, docs in jobs for d in docs]
    start = time.perf_counter()
    ce.predict(pairs, batch_size=32, show_progress_bar=False)
    return time.perf_counter() - start


def run_rerankq(worker: WorkerProcess, jobs: list[tuple[str, list[str]]]) -> float:
    from tasks import rerank

    start = time.perf_counter()
    handles = [rerank.apply_async((q, docs), queue=worker.queue) for q, docs in jobs]
    for h in handles:
        h.get(timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-docs", type=int, default=40)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = parser.parse_args()

    jobs = workload(args.seed, args.requests, args.max_docs, args.max_words)
    n_pairs = sum(len(d) for _, d in jobs)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis:
        model = build_minilm_cross_encoder(Path(tmp) / "minilm-ce")
        from tasks import app

        app.conf.update(broker_url=redis.url, result_backend=redis.url)
        env = {"RERANKQ_BROKER_URL": redis.url, "RERANKQ_RESULT_BACKEND": redis.url}
        worker = WorkerProcess("bench", ["--model", str(model), "--loglevel", "WARNING"], env,
                               Path(tmp) / "worker.log", f"bench-{os.getpid()}@localhost")
        try:
            worker.wait_ready(app)
            run_rerankq(worker, jobs[:4])  # warm-up
            times: dict[str, list[float]] = {"bare predict": [], "rerankq (1 worker)": []}
            for _ in range(args.repeats):
                times["bare predict"].append(run_bare(model, jobs))
                times["rerankq (1 worker)"].append(run_rerankq(worker, jobs))
        finally:
            worker.stop()

    rate = {name: n_pairs / statistics.median(ts) for name, ts in times.items()}
    base = rate["bare predict"]
    print(f"\n{len(jobs)} requests, {n_pairs} pairs, median of {args.repeats}\n")
    print("| system | median s | pairs/s | vs bare |\n| --- | --- | --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {rate[name]:.0f} | {rate[name] / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "requests": len(jobs), "pairs": n_pairs, "seconds": times, "pairs_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
