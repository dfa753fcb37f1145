"""Long documents through real workers: split into windows (the doc takes its best window's score),
truncated at either end, or refused; set per deployment and per job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from rerankq.local import WorkerProcess
from rerankq.producer import rerank
from rerankq.tasks import BadJob
from rerankq.tasks.records import SPLIT, TRUNCATE, TRUNCATE_LEFT
from rerankq.worker import windows
from rerankq.worker.torch_rankers import CrossEncoderRanker
from tests.conftest import StartWorker

pytestmark = pytest.mark.integration

QUERY = "how do I feed a sourdough starter"
PASSAGE = ("To feed a sourdough starter, discard half of it, then stir in equal weights of fresh flour and water, "
           "every day.")
FILLER = ("The committee reviewed the annual budget of the municipal transport authority and approved two new bus "
          "routes. ")
#: Past the fast ranker's 256 tokens, the passage only at its end; and a short doc, a little relevant.
LONG_DOC = FILLER * 14 + PASSAGE
DISTRACTOR = "Bread is baked in a hot oven until its crust is brown."
BATCH_TOKENS = 1024


@pytest.fixture(scope="module")
def fast(start_worker: StartWorker) -> WorkerProcess:
    return start_worker("--ranker", "fast")


@pytest.fixture(scope="module")
def splitting(start_worker: StartWorker, tiny_model: Path) -> WorkerProcess:
    """A cross-encoder worker whose deployment splits long docs, with small forward batches."""
    return start_worker("--model", str(tiny_model), RERANKQ_LONG_DOCS=SPLIT,
                        RERANKQ_MAX_BATCH_TOKENS=str(BATCH_TOKENS))


def test_a_passage_past_the_first_window_ranks_its_doc_first_when_split_and_not_when_truncated(
        fast: WorkerProcess) -> None:
    truncated = rerank(QUERY, [LONG_DOC, DISTRACTOR], queue=fast.queue, long_docs=TRUNCATE)
    split = rerank(QUERY, [LONG_DOC, DISTRACTOR], queue=fast.queue, long_docs=SPLIT)
    assert truncated.scores[0] < truncated.scores[1]
    assert split.scores[0] > split.scores[1]
    assert split.scores[1] == pytest.approx(truncated.scores[1], abs=1e-5)  # a short doc is one window either way


def test_split_windows_are_pairs_in_the_forward_batches_and_the_doc_takes_the_best(
        splitting: WorkerProcess, tiny_model: Path) -> None:
    long_doc = " ".join(f"word{i}" for i in range(1500))
    result = rerank(QUERY, [long_doc, DISTRACTOR], queue=splitting.queue)  # the deployment's default: split
    ranker = CrossEncoderRanker(str(tiny_model), "cpu")
    pieces = windows.pieces(long_doc, ranker.offsets(long_doc), ranker.window_budget(QUERY), SPLIT, 64, 8)
    assert len(pieces) == 8  # the most RERANKQ_MAX_WINDOWS keeps
    assert all(n <= ranker.max_length for n in ranker.encode(QUERY, pieces).costs)
    reference = CrossEncoder(str(tiny_model), device="cpu")
    want = [max(reference.predict([(QUERY, p) for p in pieces])), reference.predict([(QUERY, DISTRACTOR)])[0]]
    np.testing.assert_allclose(result.scores, want, rtol=0, atol=1e-5)
    # Alone on the worker, its batches hold its 8 windows and the short doc, each batch within the budget.
    assert sum(batch.pairs for batch in result.batches) == len(pieces) + 1
    assert all(batch.padded_tokens <= BATCH_TOKENS for batch in result.batches)


def test_a_job_overrides_the_deployment_truncating_either_end(splitting: WorkerProcess, tiny_model: Path) -> None:
    long_doc = " ".join(f"word{i}" for i in range(1500))
    reference = CrossEncoder(str(tiny_model), device="cpu")
    end_cut = rerank(QUERY, [long_doc], queue=splitting.queue, long_docs=TRUNCATE)
    assert end_cut.scores[0] == pytest.approx(float(reference.predict([(QUERY, long_doc)])[0]), abs=1e-5)
    assert sum(batch.pairs for batch in end_cut.batches) == 1
    start_cut = rerank(QUERY, [long_doc], queue=splitting.queue, long_docs=TRUNCATE_LEFT)
    ranker = CrossEncoderRanker(str(tiny_model), "cpu")
    [tail] = windows.pieces(long_doc, ranker.offsets(long_doc), ranker.window_budget(QUERY), TRUNCATE_LEFT, 0, 1)
    assert tail.endswith("word1499") and not tail.startswith("word0 ")
    assert start_cut.scores[0] == pytest.approx(float(reference.predict([(QUERY, tail)])[0]), abs=1e-5)


def test_refusing_fails_only_a_job_with_a_long_doc_saying_which(splitting: WorkerProcess) -> None:
    with pytest.raises(BadJob, match=r"docs\[1\] is \d+ tokens, over the \d+ the model reads beside this query"):
        rerank(QUERY, [DISTRACTOR, "word " * 1500], queue=splitting.queue, long_docs="refuse")
    assert len(rerank(QUERY, [DISTRACTOR], queue=splitting.queue, long_docs="refuse").scores) == 1


def test_an_unknown_mode_is_a_bad_job(splitting: WorkerProcess) -> None:
    with pytest.raises(BadJob, match="long_docs must be one of 'truncate', 'truncate-left', 'split', 'refuse'"):
        rerank(QUERY, [DISTRACTOR], queue=splitting.queue, long_docs="summarise")
