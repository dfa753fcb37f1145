"""Rankers with real model code: the bundled fast ranker and the cross-encoder behind one interface."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer

from rerankq.local import WorkerProcess
from rerankq.tasks import Result, rerank
from rerankq.worker.model import Model
from rerankq.worker.pending import Pending
from rerankq.worker.rankers import Launched, Ranker
from rerankq.worker.simulated import SimulatedRanker
from rerankq.worker.stats import Recent
from rerankq.worker.tokens import Tokens, pad
from rerankq.worker.torch_rankers import CrossEncoderRanker, FastRanker
from tests.conftest import StartWorker
from tests.tiny_models import build_xlmr_cross_encoder

CASES = [
    ("how do I feed a sourdough starter",
     "Feed the starter equal weights of flour and water once a day and keep it warm.",
     "The stock market closed lower after the central bank raised interest rates."),
    ("symptoms of dehydration",
     "Thirst, dark urine, dizziness and tiredness are signs the body is short of water.",
     "The Eiffel Tower was finished in 1889 for the World's Fair in Paris."),
    ("what does a GPU do in deep learning",
     "GPUs run the large matrix multiplications of neural networks in parallel, speeding up training.",
     "Sourdough bread gets its sour taste from lactic acid bacteria in the starter."),
]


@pytest.fixture(scope="module")
def fast() -> FastRanker:
    return FastRanker("", "cpu")


def test_the_fast_ranker_puts_the_relevant_passage_first(fast: FastRanker) -> None:
    for query, relevant, irrelevant in CASES:
        good, bad = fast.score([(query, relevant), (query, irrelevant)])
        assert good > bad + 0.2, (query, good, bad)


def test_the_fast_ranker_scores_are_cosines_of_the_bundled_model(fast: FastRanker) -> None:
    query, relevant, _ = CASES[0]
    emb = fast._st.encode([query, relevant], normalize_embeddings=True)
    assert fast.score([(query, relevant)])[0] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
    assert fast.model == "all-MiniLM-L6-v2"


def test_the_fast_ranker_charges_each_query_once(fast: FastRanker) -> None:
    counts = fast.encode("one two three", ["a", "b c"]).costs
    assert counts == [5 + 3, 4]  # [CLS] one two three [SEP] + [CLS] a [SEP]; [CLS] b c [SEP]


def test_the_cross_encoder_ranker_matches_predict(tiny_model: Path) -> None:
    ranker = CrossEncoderRanker(str(tiny_model), "cpu")
    pairs = [("river bank", "a bank by the river"), ("loan", "interest rates rose"), ("x", "y " * 600)]
    want = CrossEncoder(str(tiny_model), device="cpu").predict(pairs)
    np.testing.assert_allclose(ranker.activate(ranker.score(pairs)), want, rtol=0, atol=1e-5)
    assert ranker.encode("x", ["y " * 600]).costs[0] == ranker.max_length == 512


@pytest.mark.parametrize("builder", ["tiny_model", "xlmr_model"])
def test_a_long_query_read_once_scores_and_counts_as_the_whole_query(builder: str, request: pytest.FixtureRequest,
                                                                     fast: FastRanker) -> None:
    """The preparer cuts a query to what the model reads (its first max_length tokens) once per job, and pairs
    that with each doc: the scores and token counts are those of the whole query, truncated per pair (a doc
    itself past the model's length: see ``CrossEncoderRanker.query_read``)."""
    ranker = CrossEncoderRanker(str(request.getfixturevalue(builder)), "cpu")
    query = " ".join(f"word{i} sourdough" for i in range(800))  # far over 512 tokens
    read = ranker.query_read(query)
    assert query.startswith(read) and len(read) < len(query) / 2
    docs = ["flour and water", "y " * 300, "a river bank " * 100]  # the last two share the length with the query
    whole, once = [(query, d) for d in docs], [(read, d) for d in docs]
    np.testing.assert_allclose(ranker.score(once), ranker.score(whole), rtol=0, atol=1e-6)
    assert ranker.encode(read, [*docs, "y " * 600]).costs == ranker.encode(query, [*docs, "y " * 600]).costs
    assert ranker.query_read("short query") == "short query"
    assert fast.score([(fast.query_read(query), "flour")]) == pytest.approx(fast.score([(query, "flour")]), abs=1e-6)


def test_the_cross_encoder_ranker_runs_the_default_models_architecture(tmp_path: Path) -> None:
    """bge-reranker-v2-m3 is an XLM-RoBERTa: padding-aware position ids, one label, sigmoid as predict has."""
    model = str(build_xlmr_cross_encoder(tmp_path / "xlmr", "tiny"))
    ranker = CrossEncoderRanker(model, "cpu")
    pairs = [("river bank", "a bank by the river"), ("loan", "interest rates rose " * 40), ("x", "y " * 600)]
    reference = CrossEncoder(model, device="cpu")
    np.testing.assert_allclose(ranker.activate(ranker.score(pairs)), reference.predict(pairs), rtol=0, atol=1e-5)
    # Raw scores are the logits: what predict gives without its sigmoid.
    logits = reference.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(ranker.score(pairs), logits, rtol=0, atol=1e-5)
    assert not np.allclose(logits, reference.predict(pairs), atol=1e-3)
    # One batch of mixed lengths scores each pair as it scores alone: padding changes nothing.
    np.testing.assert_allclose(ranker.score(pairs), [ranker.score([p])[0] for p in pairs], rtol=0, atol=1e-5)


@pytest.mark.integration
def test_a_fast_worker_serves_jobs_and_says_so(start_worker: StartWorker) -> None:
    worker: WorkerProcess = start_worker("--ranker", "fast")
    handles = [rerank.apply_async((q, [bad, good]), queue=worker.queue) for q, good, bad in CASES]
    for handle in handles:
        result = Result.from_dict(handle.get(timeout=60))
        assert result.ranker == "fast" and result.model == "all-MiniLM-L6-v2"
        assert result.scores[1] > result.scores[0]


def encoded(ranker: Ranker, query: str, docs: list[str]) -> Pending:
    """A job as the preparer leaves it: its pairs encoded, every one left to score."""
    pending = Pending(None, 0.0)
    pending.encoded = ranker.encode(query, docs)
    pending.costs = pending.encoded.costs
    pending.begin()
    return pending


def run_all(model: Model, jobs: list[Pending]) -> None:
    """One forward batch of every pair left, taken as the runner takes them."""
    batch = [(p, i) for p in jobs for i in p.left]
    for pending in jobs:
        pending.take(list(pending.left))
    model.forward(batch)


def test_each_pair_is_tokenised_once_by_the_preparer_and_scored_from_those_ids(
        xlmr_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranker = CrossEncoderRanker(str(xlmr_model), "cpu")
    calls: list[int] = []
    tokenizer_class = type(ranker._tokenizer)
    real = tokenizer_class.__call__

    def counting(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(text) if isinstance(text, list) else 1)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", counting)
    jobs = [encoded(ranker, query, [good, bad, "y " * 600]) for query, good, bad in CASES]
    assert calls == [3, 3, 3]  # one call per job, tokenising each of its pairs once
    calls.clear()
    run_all(Model(ranker, Recent()), jobs)
    assert calls == []  # the forward batch was padded from the preparer's ids
    reference = CrossEncoder(str(xlmr_model), device="cpu")
    for pending, (query, good, bad) in zip(jobs, CASES, strict=True):
        want = reference.predict([(query, good), (query, bad), (query, "y " * 600)], activation_fn=torch.nn.Identity())
        np.testing.assert_allclose(pending.scores, want, rtol=0, atol=1e-5)
        assert pending.done and pending.error is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_the_preparers_ids_gives_the_tokenizers_own_padded_batch(tiny_model: Path, side: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.padding_side = side
    queries, docs = ["a short query", "q", "a query of some more words"], ["doc", "a much longer doc " * 20, "mid doc"]
    tokens = Tokens.of(tokenizer(queries, docs, truncation=True, max_length=64), ["token_type_ids"])
    order = [2, 0, 1]  # rows of a batch come in any order
    want = tokenizer([queries[i] for i in order], [docs[i] for i in order], truncation=True, max_length=64,
                     padding=True, return_tensors="np")
    got = pad([(tokens, i) for i in order], tokenizer.pad_token_id, left=side == "left")
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_batch_that_ran_out_of_memory_is_retried_once_the_failed_forwards_memory_is_free() -> None:
    """pytorch#18853: a retry inside the ``except`` keeps the failed forward's frames, and its activations, alive."""

    class Activations:
        pass

    freed: list[bool] = []

    class Tight(SimulatedRanker):
        failed: weakref.ref[Activations] | None = None

        def launch(self, prepared: Any) -> Launched:
            activations = Activations()  # what the forward allocated: held by its frame
            if len(prepared[1]) > 1:
                Tight.failed = weakref.ref(activations)
                raise MemoryError("simulated out of memory")
            freed.append(Tight.failed is not None and Tight.failed() is None)
            return super().launch(prepared)

    model = Model(Tight("latency_ms=0,token_us=0"), Recent())
    job = encoded(model.ranker, "bread", ["bread one", "bread two", "bread three"])
    run_all(model, [job])
    assert job.error is None and job.scores == [1.0, 1.0, 1.0]
    assert freed == [True, True, True]
    assert model.out_of_memory_at is not None  # the runner lowers its budget from here (batching.after_out_of_memory)
