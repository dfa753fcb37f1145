"""In-process scoring on this machine: the pairs of one workload scored by rerankq's ranker in
length-sorted batches under each token budget, on each backend, against ``predict`` in batches of 32.
What chose the default ``RERANKQ_MAX_BATCH_TOKENS`` on a CPU, and what measures ``RERANKQ_BACKEND``.

    python bench/batch_tokens.py --budgets 8192,4096,2048,1024
    python bench/batch_tokens.py --budgets 2048 --backends torch,onnx,onnx-int8

Scores of each are compared with ``predict``'s: the largest difference, and the share of requests whose
docs come out in the same order.
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

from bench.workload import Request, workload  # noqa: E402


def sorted_batches(costs: list[int], max_tokens: int) -> list[list[int]]:
    """Pair indices in forward batches, longest first, each batch's padded size within ``max_tokens``: the
    batches a worker runs over a window of these pairs (worker/batching.py)."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches, start = [], 0
    while start < len(order):
        size = max(1, max_tokens // max(1, costs[order[start]]))
        batches.append(order[start:start + size])
        start += size
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="8192,4096,2048,1024")
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-docs", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rerankq.worker.onnx_ranker import OnnxCrossEncoderRanker
    from rerankq.worker.rankers import Ranker
    from rerankq.worker.torch_rankers import CrossEncoderRanker
    from tests.tiny_models import build_minilm_cross_encoder

    requests = workload(1, args.requests, 1, args.max_docs, 5, args.max_words)
    pairs = [(r.query, d) for r in requests for d in r.docs]
    model = str(build_minilm_cross_encoder(Path(tempfile.mkdtemp()) / "ce"))
    predict = CrossEncoderRanker(model, "cpu", 512)
    backends: dict[str, Callable[[], Ranker]] = {
        "torch": lambda: predict,
        "onnx": lambda: OnnxCrossEncoderRanker(model, "cpu", 512),  # fp32: measured, not a setting
        "onnx-int8": lambda: OnnxCrossEncoderRanker(model, "cpu", 512, int8=True)}
    rankers = {b: backends[b]() for b in args.backends.split(",")}
    costs = [c for r in requests for c in predict.encode(r.query, r.docs).costs]  # every backend's tokenizer

    def budget(ranker: Ranker, tokens: int) -> Callable[[], list[float]]:
        def run() -> list[float]:
            scores = [0.0] * len(pairs)
            for batch in sorted_batches(costs, tokens):
                for i, s in zip(batch, ranker.activate(ranker.score([pairs[i] for i in batch])), strict=True):
                    scores[i] = s
            return scores
        return run

    cases: dict[str, Callable[[], list[float]]] = {"predict, batch 32": lambda: [
        float(s) for s in predict._ce.predict(pairs, batch_size=32, show_progress_bar=False)]}
    for backend, ranker in rankers.items():
        cases.update({f"{backend}, sorted, {n} tokens": budget(ranker, n) for n in map(int, args.budgets.split(","))})
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    scores: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            scores[name] = run()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["predict, batch 32"])
    reference = scores["predict, batch 32"]
    print(f"\n{len(pairs)} pairs, {sum(costs)} real tokens; medians of {args.repeats}\n")
    print("| batches | median s | vs predict | largest score difference | same order |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in seconds.items():
        got = scores[name]
        print(f"| {name} | {statistics.median(ts):.2f} | {base / statistics.median(ts):.2f}x | "
              f"{max(abs(a - b) for a, b in zip(got, reference, strict=True)):.2g} | "
              f"{same_order(requests, got, reference):.0%} |")


def same_order(requests: list[Request], got: list[float], want: list[float]) -> float:
    """The share of requests whose docs ``got`` ranks in the order ``want`` does."""
    same, start = 0, 0
    for request in requests:
        n = len(request.docs)
        rank = sorted(range(n), key=lambda i: -got[start + i])
        same += rank == sorted(range(n), key=lambda i: -want[start + i])
        start += n
    return same / len(requests)


if __name__ == "__main__":
    main()
