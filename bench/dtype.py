"""bf16 against fp32 on this CPU: how much faster each model scores, and how far bf16 moves its scores and
its ranking, request by request over the bench workload (the same pairs, the same forward batches).

    python -m bench.dtype [--requests 30 --max-docs 30 --max-words 120 --repeats 3] [--int8] \
        --out bench/results/dtype-<commit>.json

Models: the bundled all-MiniLM-L6-v2 bi-encoder (the fast ranker, trained weights), a MiniLM cross-encoder (that
encoder, with a fresh one-score head) and an XLM-RoBERTa-base-wide six-layer cross-encoder (random weights).
``--int8`` adds the ONNX int8 backend against fp32 for the cross-encoders. Per request: the largest score
difference, Kendall's tau of the two orders, and how many of fp32's top 5 bf16 also ranks in its top 5.
Speed: every request scored in turn, one forward batch each, in each dtype in alternation, ``--repeats``
times; pairs/s are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from bench import provenance
from bench.workload import Request, add_arguments, shape, workload


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a of two score lists over the same items (1: the same order; pairs tied in either count 0)."""
    pairs = list(combinations(range(len(a)), 2))
    if not pairs:
        return 1.0
    agree = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    disagree = sum((a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs)
    return (agree - disagree) / len(pairs)


def top_agreement(a: Sequence[float], b: Sequence[float], k: int = 5) -> float:
    """Share of ``a``'s top ``k`` that are also in ``b``'s top ``k``."""
    k = min(k, len(a))
    top = lambda s: set(sorted(range(len(s)), key=lambda i: -s[i])[:k])  # noqa: E731
    return len(top(a) & top(b)) / k if k else 1.0


def compare(reference: list[list[float]], other: list[list[float]]) -> dict[str, float]:
    diffs = [max(abs(x - y) for x, y in zip(r, o, strict=True)) for r, o in zip(reference, other, strict=True)]
    taus = [kendall_tau(r, o) for r, o in zip(reference, other, strict=True)]
    tops = [top_agreement(r, o) for r, o in zip(reference, other, strict=True)]
    return {"max_abs_diff": max(diffs), "median_max_abs_diff": statistics.median(diffs),
            "kendall_tau_median": statistics.median(taus), "kendall_tau_min": min(taus),
            "top5_agreement_mean": statistics.mean(tops),
            "top5_same_set_share": sum(t == 1.0 for t in tops) / len(tops)}


def scores_and_speed(score: Callable[[list[tuple[str, str]]], list[float]], requests: list[Request]
                     ) -> tuple[list[list[float]], float]:
    started = time.perf_counter()
    scores = [score([(r.query, d) for d in r.docs]) for r in requests]
    return scores, sum(len(r.docs) for r in requests) / (time.perf_counter() - started)


def models(into: Path) -> list[tuple[str, str, str]]:
    """(name, ranker kind, path) of each model measured."""
    from tests.tiny_models import build_minilm_cross_encoder, build_xlmr_cross_encoder

    return [("all-MiniLM-L6-v2 bi-encoder (fast ranker)", "fast", ""),
            ("MiniLM-L6 cross-encoder", "cross-encoder", str(build_minilm_cross_encoder(into / "minilm"))),
            ("XLM-R-base-wide 6-layer cross-encoder", "cross-encoder",
             str(build_xlmr_cross_encoder(into / "xlmr", "base-6")))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--int8", action="store_true", help="also the ONNX int8 backend (cross-encoders)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from rerankq.worker.dtype import cpu_has_native_bf16
    from rerankq.worker.rankers import load_ranker

    run = provenance.describe()  # the tree as the run starts
    requests = workload(args.seed, args.requests, **shape(args))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rerankq-bench-dtype-") as tmp:
        for name, kind, path in models(Path(tmp)):
            rankers = {dtype: load_ranker(kind, path, "cpu", 512, "torch", dtype) for dtype in ("fp32", "bf16")}
            if args.int8 and kind == "cross-encoder":
                rankers["int8"] = load_ranker(kind, path, "cpu", 512, "onnx-int8")
            for ranker in rankers.values():  # warm-up
                ranker.score([(requests[0].query, d) for d in requests[0].docs])
            speeds: dict[str, list[float]] = {dtype: [] for dtype in rankers}
            scores: dict[str, list[list[float]]] = {}
            for _ in range(args.repeats):
                for dtype, ranker in rankers.items():
                    scores[dtype], pairs_per_s = scores_and_speed(ranker.score, requests)
                    speeds[dtype].append(pairs_per_s)
            for dtype in rankers:
                if dtype == "fp32":
                    continue
                fp32, other = statistics.median(speeds["fp32"]), statistics.median(speeds[dtype])
                rows.append({"model": name, "dtype": dtype, "fp32_pairs_per_s": round(fp32, 1),
                             "pairs_per_s": round(other, 1), "speedup": round(other / fp32, 2),
                             "fp32_runs": [round(s, 1) for s in speeds["fp32"]],
                             "runs": [round(s, 1) for s in speeds[dtype]],
                             **{k: round(v, 4) for k, v in compare(scores["fp32"], scores[dtype]).items()}})
                print(json.dumps(rows[-1]), flush=True)

    header = ("| model | against fp32 | fp32 pairs/s | pairs/s | speed-up | largest score diff (median per "
              "request) | Kendall tau median (min) | top-5 kept | same top-5 set |")
    print("\n" + header + "\n|" + " --- |" * 9)
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['fp32_pairs_per_s']} | {r['pairs_per_s']} | {r['speedup']}x | "
              f"{r['max_abs_diff']} ({r['median_max_abs_diff']}) | {r['kendall_tau_median']} "
              f"({r['kendall_tau_min']}) | {100 * r['top5_agreement_mean']:.1f}% | "
              f"{100 * r['top5_same_set_share']:.0f}% |")
    report = {**run, "native_bf16": cpu_has_native_bf16(),
              "workload": {"seed": args.seed, "requests": args.requests, **shape(args)}, "repeats": args.repeats,
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
