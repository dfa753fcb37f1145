"""A job's pairs as token ids, made once by the preparer thread and padded into each forward batch from there.

Tokenising a pair to count its tokens and again to score it cost the runner thread a tokenisation per pair,
between two forward batches, while a GPU waits (issue #33). The preparer keeps the ids it counted (truncated as
the model reads them) in two flat arrays per job; ``pad`` builds a forward batch's inputs from any jobs' rows
with a copy per row.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Ids = npt.NDArray[np.int32]


@dataclass(eq=False)
class Tokens:
    """Rows of token ids end to end: row ``i`` is ``ids[starts[i]:starts[i + 1]]``; ``extra`` holds the other
    per-token inputs the tokenizer gives (``token_type_ids``) in the same layout. Nothing changes it once made:
    the preparer writes it, the runner reads it."""

    ids: Ids
    starts: npt.NDArray[np.int64]
    extra: dict[str, Ids] = field(default_factory=dict)

    @classmethod
    def of(cls, encoded: Mapping[str, Sequence[Sequence[int]]], names: Sequence[str]) -> Tokens:
        """From a tokenizer's unpadded output: its ``input_ids`` and those of ``names`` it has."""
        rows = encoded["input_ids"]
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        starts = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        total = int(starts[-1])

        def flat(name: str) -> Ids:
            return np.fromiter(itertools.chain.from_iterable(encoded[name]), dtype=np.int32, count=total)

        extra = {name: flat(name) for name in names if name != "input_ids" and name in encoded}
        return cls(flat("input_ids"), starts, extra)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> list[int]:
        return [int(n) for n in np.diff(self.starts)]


def pad(rows: Sequence[tuple[Tokens, int]], pad_id: int, left: bool = False) -> dict[str, npt.NDArray[np.int64]]:
    """One forward batch's inputs: each (tokens, row) padded to the longest row with ``pad_id`` (extra inputs with
    0) on the right, or on the ``left`` for a tokenizer that pads there; and the attention mask."""
    lengths = [int(tokens.starts[row + 1] - tokens.starts[row]) for tokens, row in rows]
    width = max(lengths, default=0)
    names = rows[0][0].extra.keys() if rows else ()
    inputs = {"input_ids": np.full((len(rows), width), pad_id, dtype=np.int64),
              **{name: np.zeros((len(rows), width), dtype=np.int64) for name in names},
              "attention_mask": np.zeros((len(rows), width), dtype=np.int64)}
    for r, ((tokens, row), n) in enumerate(zip(rows, lengths, strict=True)):
        span = slice(width - n, width) if left else slice(0, n)
        start = tokens.starts[row]
        inputs["input_ids"][r, span] = tokens.ids[start:start + n]
        for name in names:
            inputs[name][r, span] = tokens.extra[name][start:start + n]
        inputs["attention_mask"][r, span] = 1
    return inputs
