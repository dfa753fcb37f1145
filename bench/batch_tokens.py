"""Forward-batch size on this machine: the pairs of one workload scored in-process by rerankq's ranker in
length-sorted batches under each token budget, against ``predict`` in batches of 32. What chose the
default ``RERANKQ_MAX_BATCH_TOKENS`` on a CPU.

    python bench/batch_tokens.py --budgets 8192,4096,2048,1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="8192,4096,2048,1024")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-docs", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tests.tiny_models import build_minilm_cross_encoder
    from worker.chunker import plan_batches
    from worker.rankers import CrossEncoderRanker

    requests = workload(1, args.requests, 1, args.max_docs, 5, args.max_words)
    pairs = [(r.query, d) for r in requests for d in r.docs]
    ranker = CrossEncoderRanker(str(build_minilm_cross_encoder(Path(tempfile.mkdtemp()) / "ce")), "cpu", 512)
    costs = [c for r in requests for c in ranker.token_counts(r.query, r.docs)]

    def budget(tokens: int) -> Callable[[], object]:
        return lambda: [ranker.score([pairs[i] for i in b]) for b in plan_batches(costs, tokens)]

    cases: dict[str, Callable[[], object]] = {
        "predict, batch 32": lambda: ranker._ce.predict(pairs, batch_size=32, show_progress_bar=False)}
    cases.update({f"sorted, {n} tokens": budget(n) for n in map(int, args.budgets.split(","))})
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["predict, batch 32"])
    print(f"\n{len(pairs)} pairs, {sum(costs)} real tokens; medians of {args.repeats}\n")
    print("| batches | median s | vs predict |\n| --- | --- | --- |")
    for name, ts in seconds.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {base / statistics.median(ts):.2f}x |")


if __name__ == "__main__":
    main()
