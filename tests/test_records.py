"""Job validation and result records: pure logic."""

from __future__ import annotations

import dataclasses
import math

import pytest

from rerankq.tasks.errors import BadJob
from rerankq.tasks.records import BatchInfo, Job, Result, Timings, top_indices


def test_a_valid_call_becomes_a_job() -> None:
    job = Job.from_call(["q", ["a", "b"]], {"top_k": 1, "deadline": 5, "raw_scores": True}, max_docs=10)
    assert job == Job("q", ["a", "b"], top_k=1, deadline=5.0, raw_scores=True)


def test_fields_may_come_by_name() -> None:
    assert Job.from_call([], {"query": "q", "docs": []}, max_docs=10) == Job("q", [])


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (["q", ["a"]], {"query": "again"}, "'query' given twice"),
    (["q", ["a"]], {"deadline": math.inf}, "deadline must be a Unix time"),
    (["q", ["a"]], {"deadline": True}, "deadline must be a Unix time"),
    (["q", ["a"]], {"top_k": True}, "top_k must be a positive integer"),
    (["q", ["a"]], {"raw_scores": 1}, "raw_scores must be true or false, got 1"),
    (["q", {"a": 1}], {}, "docs must be a list of strings, got dict"),
    ([None, ["a"]], {}, "query must be a string, got NoneType"),
    ("q", {}, "a job is rerank(query, docs"),
])
def test_malformed_calls_say_what_is_wrong(args: object, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadJob) as caught:
        Job.from_call(args, kwargs, max_docs=10)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_the_doc_limit_is_inclusive() -> None:
    assert len(Job.from_call(["q", ["d"] * 3], {}, max_docs=3).docs) == 3
    with pytest.raises(BadJob, match="4 docs is over the limit of 3"):
        Job.from_call(["q", ["d"] * 4], {}, max_docs=3)


def test_top_indices_are_best_first_and_ties_keep_input_order() -> None:
    assert top_indices([0.1, 0.9, 0.5, 0.9], 3) == [1, 3, 2]
    assert top_indices([0.3], 5) == [0]


def test_a_result_round_trips_through_its_dict() -> None:
    result = Result([0.5, 0.1], "cross-encoder", "m", Timings(1.0, 2.0), top=[0], batches=[BatchInfo("w#1", 2, 3, 30)])
    assert Result.from_dict(result.to_dict()) == result


@pytest.mark.parametrize("top", [[0], None])
def test_a_results_written_out_dict_is_what_asdict_gives(top: list[int] | None) -> None:
    result = Result([0.5, 0.1], "cross-encoder", "m", Timings(1.0, 2.0), top=top,
                    batches=[BatchInfo("w#1", 2, 3, 30), BatchInfo("w#2", 1, 1, 8)])
    assert result.to_dict() == dataclasses.asdict(result)
