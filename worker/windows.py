"""Long documents: what a doc longer than the model reads beside its query becomes. Truncated at its end
(the model's own truncation), truncated at its start, refused, or split into overlapping windows, each
scored as a pair of its own in the same forward batches, the doc taking its best window's score.

Pure: a doc's token offsets in, its pieces of text out; the ranker supplies the offsets and the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rerankq.tasks.errors import BadJob
from rerankq.tasks.records import REFUSE, SPLIT, TRUNCATE, TRUNCATE_LEFT

Offsets = Sequence[tuple[int, int]]


def spans(tokens: int, budget: int, overlap: int, most: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of at most ``most`` windows of at most ``budget`` tokens, each sharing
    ``overlap`` tokens with the next (at most half a window), from the doc's start."""
    if tokens <= budget:
        return [(0, tokens)]
    step = max(budget - overlap, (budget + 1) // 2)
    windows: list[tuple[int, int]] = []
    start = 0
    while len(windows) < most:
        end = min(tokens, start + budget)
        windows.append((start, end))
        if end == tokens:
            break
        start += step
    return windows


def pieces(text: str, offsets: Offsets, budget: int, mode: str, overlap: int, most: int) -> list[str]:
    """The texts scored for one doc (one, unless split). ``offsets`` are its tokens' character ranges."""
    if len(offsets) <= budget:
        return [text]
    if mode == REFUSE:
        raise ValueError(f"{len(offsets)} tokens, over the {budget} the model reads beside this query")
    if mode == TRUNCATE_LEFT:
        return [text[offsets[len(offsets) - budget][0]:]]
    if mode == SPLIT:
        return [text[offsets[start][0]:offsets[end - 1][1]] for start, end in spans(len(offsets), budget, overlap,
                                                                                    most)]
    return [text]  # truncated at its end by the model's tokenizer, as every pair is


def effective(mode: str, ranker_kind: str) -> str:
    """The fast ranker reads less than the cross-encoder (256 tokens against 512): refusing what it cannot read
    would fail, only while load is shed, jobs the cross-encoder takes. Its answers are degraded ones already."""
    return TRUNCATE if mode == REFUSE and ranker_kind == "fast" else mode


def expand(docs: Sequence[str], mode: str, budget: int, floor: int, offsets: Callable[[str], Offsets],
           overlap: int, most: int) -> tuple[list[str], list[int]]:
    """A job's pieces of text to score, and the doc each belongs to. ``budget`` is what the model reads of a
    doc beside the query; a long query leaves a doc at least ``floor`` (the tokenizer then cuts the query
    too), except when refusing: what does not fit whole is refused. Truncating at the end (the default) is
    the tokenizer's own: no doc is read twice for it."""
    if mode == TRUNCATE:
        return list(docs), list(range(len(docs)))
    if mode == REFUSE and budget < 1:
        raise BadJob("the query alone is as long as the model reads (RERANKQ_MAX_LENGTH): with long_docs "
                     "'refuse' (TEI's truncate: false) send a shorter query")
    budget = budget if mode == REFUSE else max(budget, floor, 1)
    texts: list[str] = []
    owners: list[int] = []
    for doc_index, doc in enumerate(docs):
        try:
            cut = pieces(doc, offsets(doc), budget, mode, overlap, most)
        except ValueError as exc:
            raise refused(doc_index, str(exc)) from None
        texts += cut
        owners += [doc_index] * len(cut)
    return texts, owners


def best(scores: Sequence[float], owners: Sequence[int], docs: int) -> list[float]:
    """Each doc's score: the best of its pieces' (``owners[i]`` is the doc of piece ``i``)."""
    out: list[float | None] = [None] * docs
    for score, doc in zip(scores, owners, strict=True):
        held = out[doc]
        if held is None or score > held or held != held:  # a NaN piece never hides a scored one
            out[doc] = score
    assert all(s is not None for s in out), "every doc has a piece"
    return [float(s) for s in out]  # type: ignore[arg-type]


def refused(doc: int, reason: str) -> BadJob:
    return BadJob(f"docs[{doc}] is {reason}: with long_docs 'refuse' (TEI's truncate: false) a doc must fit "
                  "(RERANKQ_MAX_LENGTH); send long_docs 'truncate' or 'split', or a shorter doc")
