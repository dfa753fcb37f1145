"""Long documents cut into pieces, and a doc's score from its pieces': pure logic."""

from __future__ import annotations

import itertools
import re

import pytest

from rerankq.tasks.errors import BadJob
from rerankq.tasks.records import REFUSE, SPLIT, TRUNCATE, TRUNCATE_LEFT
from rerankq.worker.windows import best, effective, expand, pieces, spans


def words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def test_a_doc_that_fits_is_one_window_whatever_the_mode() -> None:
    assert spans(5, 8, 2, 4) == [(0, 5)]
    for mode in (TRUNCATE, TRUNCATE_LEFT, SPLIT, REFUSE):
        assert pieces("a b c", words("a b c"), 3, mode, 1, 4) == ["a b c"]


def test_windows_cover_the_doc_each_within_the_budget_overlapping_their_neighbour() -> None:
    windows = spans(20, 8, 2, 10)
    assert windows == [(0, 8), (6, 14), (12, 20)]
    assert all(end - start <= 8 for start, end in windows)
    assert all(a[1] - b[0] == 2 for a, b in itertools.pairwise(windows))


def test_at_most_the_first_windows_are_kept() -> None:
    assert spans(100, 10, 0, 3) == [(0, 10), (10, 20), (20, 30)]


def test_an_overlap_of_more_than_half_a_window_still_moves_by_half() -> None:
    assert spans(10, 4, 4, 10) == [(0, 4), (2, 6), (4, 8), (6, 10)]


def test_split_pieces_are_the_docs_own_text_at_token_boundaries() -> None:
    text = "one two three four five six seven"
    assert pieces(text, words(text), 3, SPLIT, 1, 10) == ["one two three", "three four five", "five six seven"]


def test_truncating_at_the_start_keeps_the_end() -> None:
    text = "one two three four five"
    assert pieces(text, words(text), 2, TRUNCATE_LEFT, 0, 1) == ["four five"]


def test_truncating_at_the_end_is_left_to_the_tokenizer() -> None:
    text = "one two three four five"
    assert pieces(text, words(text), 2, TRUNCATE, 0, 1) == [text]


def test_refusing_says_how_long_against_what() -> None:
    with pytest.raises(ValueError, match="5 tokens, over the 2 the model reads"):
        pieces("one two three four five", words("one two three four five"), 2, REFUSE, 0, 1)


def test_a_doc_takes_its_best_pieces_score() -> None:
    assert best([0.1, 0.7, 0.3, 0.2], [0, 0, 1, 2], 3) == [0.7, 0.3, 0.2]


def test_expanding_maps_each_piece_to_its_doc_and_leaves_the_default_alone() -> None:
    docs = ["a b", "one two three four five six seven", ""]
    assert expand(docs, TRUNCATE, 0, 1, words, 1, 10) == (docs, [0, 1, 2])
    texts, owners = expand(docs, SPLIT, 3, 1, words, 1, 10)
    assert texts == ["a b", "one two three", "three four five", "five six seven", ""]
    assert owners == [0, 1, 1, 1, 2]


def test_a_long_query_leaves_a_doc_its_floor_but_refusing_counts_the_whole_pair() -> None:
    text = "one two three four five"
    assert expand([text], SPLIT, -4, 2, words, 0, 10)[0] == ["one two", "three four", "five"]
    with pytest.raises(BadJob, match="the query alone is as long as the model reads"):
        expand([text], REFUSE, 0, 2, words, 0, 10)
    with pytest.raises(BadJob, match=r"docs\[0\] is 5 tokens, over the 3"):
        expand([text], REFUSE, 3, 2, words, 0, 10)


def test_the_fast_ranker_truncates_what_it_would_refuse() -> None:
    assert effective(REFUSE, "fast") == TRUNCATE
    assert effective(REFUSE, "cross-encoder") == REFUSE
    assert effective(SPLIT, "fast") == SPLIT


def test_a_nan_piece_never_hides_a_scored_one() -> None:
    nan = float("nan")
    assert best([nan, 0.4], [0, 0], 1) == [0.4]
    assert best([0.4, nan], [0, 0], 1) == [0.4]
