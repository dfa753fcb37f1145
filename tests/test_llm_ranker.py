"""The LLM reranker (worker/llm_ranker.py) on a tiny random Qwen3 built on disk: its scores against a direct
computation of the Qwen3-Reranker recipe, batching and padding, truncation, and instructions end to end through a
real worker, a real Redis and a real ``rerankq serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rerankq import celeryconfig
from rerankq.celeryconfig import Settings
from rerankq.local import ServerProcess
from rerankq.producer import rerank
from rerankq.redis_server import free_port
from rerankq.tasks import BadJob
from rerankq.tasks import rerank as rerank_task
from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.llm_ranker import INSTRUCTION, PREFIX, SUFFIX, LlmRanker
from rerankq.worker.rankers import load_ranker
from tests.conftest import StartWorker, new_queue
from tests.tiny_models import build_qwen3_reranker

QUERY = "how do I feed a sourdough starter"
DOCS = ["feed the starter flour and water daily", "the river bank flooded after the storm", "a starter is wild yeast",
        "interest"]
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen3_reranker(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def ranker(qwen: Path) -> LlmRanker:
    loaded = load_ranker("cross-encoder", str(qwen), "cpu", MAX_LENGTH)  # its config says: a causal LM
    assert isinstance(loaded, LlmRanker) and loaded.kind == "llm"
    return loaded


def reference(path: Path, query: str, docs: list[str], instruction: str = INSTRUCTION,
              max_length: int = MAX_LENGTH) -> list[float]:
    """The recipe of Qwen3-Reranker's model card, one pair at a time (no padding): the prefix's and suffix's ids
    around the formatted line's (truncated to fit), the "yes"/"no" logits at the last position, P(yes)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    scores = []
    for doc in docs:
        line = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
        ids = tokenizer(line, add_special_tokens=False, truncation=True,
                        max_length=max_length - len(prefix) - len(suffix))["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids + suffix])).logits[0, -1]
        pair = torch.nn.functional.log_softmax(torch.stack([logits[no], logits[yes]]), dim=0)
        scores.append(float(pair[1].exp()))
    return scores


def scored(ranker: LlmRanker, query: str, docs: list[str], instruction: str | None = None) -> list[float]:
    """A job's scores as a worker computes them: its prompt read once, its pairs in one forward batch."""
    encoded = ranker.encode(ranker.query_read(query, instruction), docs)
    return ranker.activate(ranker.read(ranker.launch(ranker.prepare([(encoded, i) for i in range(len(docs))]))))


def test_scores_are_the_recipes_in_one_padded_batch(ranker: LlmRanker, qwen: Path) -> None:
    expected = reference(qwen, QUERY, DOCS)
    assert max(expected) - min(expected) > 1e-3  # the random model tells the docs apart
    np.testing.assert_allclose(scored(ranker, QUERY, DOCS), expected, atol=1e-5)
    # Alone or beside longer docs (padded on the left to them): the same scores.
    np.testing.assert_allclose([scored(ranker, QUERY, [d])[0] for d in DOCS], expected, atol=1e-5)


def test_the_instruction_is_read_and_a_job_may_send_its_own(ranker: LlmRanker, qwen: Path) -> None:
    own = "Given a question about baking, find the passage that answers it"
    expected = reference(qwen, QUERY, DOCS, own)
    np.testing.assert_allclose(scored(ranker, QUERY, DOCS, own), expected, atol=1e-5)
    assert not np.allclose(expected, reference(qwen, QUERY, DOCS), atol=1e-4)
    ranker.check_instruction(own)  # accepted


def test_a_long_document_is_cut_and_the_prompt_kept(ranker: LlmRanker, qwen: Path) -> None:
    long_doc = " ".join(f"word{i}" for i in range(400))
    encoded = ranker.encode(ranker.query_read(QUERY), [long_doc, DOCS[0]])
    assert encoded.costs[0] == MAX_LENGTH and encoded.costs[1] < MAX_LENGTH
    assert encoded.tokens is not None
    row = [int(i) for i in encoded.tokens.ids[:encoded.costs[0]]]
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    prompt = tokenizer.encode(PREFIX, add_special_tokens=False) + tokenizer.encode(
        f"<Instruct>: {INSTRUCTION}\n<Query>: {QUERY}\n<Document>:", add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    assert row[:len(prompt)] == prompt and row[-len(suffix):] == suffix  # the document's end went, nothing else
    np.testing.assert_allclose(scored(ranker, QUERY, [long_doc]), reference(qwen, QUERY, [long_doc]), atol=1e-5)
    # A query too long to leave the doc a quarter of the length is cut; the document keeps its quarter.
    long_query = " ".join(["starter"] * 300)
    assert ranker.window_budget(ranker.query_read(long_query)) >= MAX_LENGTH // 4


def test_an_instruction_that_crowds_out_the_query_is_refused(ranker: LlmRanker) -> None:
    with pytest.raises(BadJob, match="leaving the query too few: shorten the instruction, or raise RERANKQ_MAX_LENGTH"):
        ranker.query_read(QUERY, " ".join(["judge"] * 200))
    ranker.query_read(QUERY, " ".join(["judge"] * 20))  # a long one that fits


def test_a_default_instruction_too_long_is_refused_at_load(qwen: Path) -> None:
    """Refused when the worker starts, not on every job that sends none (blamed on its caller)."""
    with pytest.raises(ModelLoadError, match=r"its default instruction .* is too long"):
        LlmRanker(str(qwen), "cpu", MAX_LENGTH, instruction=" ".join(["judge"] * 200))


def test_a_cross_encoder_refuses_an_instruction_saying_why(tiny_model: Path) -> None:
    cross = load_ranker("cross-encoder", str(tiny_model), "cpu")
    cross.check_instruction(None)
    with pytest.raises(BadJob, match="takes no instruction: send none, or name an LLM reranker"):
        cross.check_instruction("judge by freshness")
    load_ranker("fast", "", "cpu").check_instruction("ignored by the fast ranker, which answers shed jobs")


@pytest.mark.integration
def test_a_worker_serves_the_llm_reranker_beside_a_cross_encoder_with_instructions(
        start_worker: StartWorker, celery_app: Any, redis_url: str, qwen: Path, tiny_model: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    default_instruction = "Find the passage about bread"
    cross, llm = new_queue(), new_queue()
    spec = json.dumps([{"name": "cross", "model": str(tiny_model), "queue": cross},
                       {"name": "qwen3", "model": str(qwen), "queue": llm, "instruction": default_instruction}])
    env = {"RERANKQ_MODELS": spec, "RERANKQ_MAX_LENGTH": str(MAX_LENGTH)}
    start_worker("--model", "cross", queue=cross, **env)
    start_worker("--model", "qwen3", queue=llm, **env)
    own = "Given a question about baking, find the passage that answers it"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(celeryconfig, "settings", Settings.from_env(env))
        patch.setattr(rerank_task, "router", None)
        patch.setattr(rerank_task, "_routers", {})
        plain = rerank(QUERY, DOCS, model="qwen3", timeout=60)
        instructed = rerank(QUERY, DOCS, model="qwen3", instruction=own, timeout=60)
        with pytest.raises(BadJob, match="the cross-encoder model 'cross' takes no instruction"):
            rerank(QUERY, DOCS, model="cross", instruction=own, timeout=60)
        assert rerank(QUERY, DOCS, model="cross", timeout=60).ranker == "cross-encoder"
    assert (plain.model, plain.ranker) == ("qwen3", "llm")
    np.testing.assert_allclose(plain.scores, reference(qwen, QUERY, DOCS, default_instruction), atol=1e-5)
    np.testing.assert_allclose(instructed.scores, reference(qwen, QUERY, DOCS, own), atol=1e-5)

    server = ServerProcess(free_port(), {"RERANKQ_BROKER_URL": redis_url, "RERANKQ_RESULT_BACKEND": redis_url,
                                         **env}, tmp_path_factory.mktemp("serve") / "serve.log")
    server.wait_ready()
    try:
        for body in ({"query": QUERY, "documents": DOCS, "model": "qwen3", "instruction": own},
                     {"query": QUERY, "texts": DOCS, "model": "qwen3", "instruction": own}):
            response = httpx.post(server.url + "/rerank", json=body, timeout=60)
            assert response.status_code == 200, response.text
            answer = response.json()
            pairs = answer["results"] if isinstance(answer, dict) else answer
            got = {r["index"]: r.get("relevance_score", r.get("score")) for r in pairs}
            np.testing.assert_allclose([got[i] for i in range(len(DOCS))], instructed.scores, atol=1e-6)
        refused = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "instruction": own},
                             timeout=60)  # the default model, a cross-encoder
        assert refused.status_code == 422 and "takes no instruction" in refused.json()["message"]
    finally:
        server.stop()
