"""The LangChain compressor and the LlamaIndex postprocessor, with the real packages, against a real worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from sentence_transformers import CrossEncoder

from rerankq.integrations.langchain import RerankqCompressor
from rerankq.integrations.llama_index import RerankqRerank
from rerankq.tasks import BadJob
from tests.conftest import StartWorker

pytestmark = pytest.mark.integration

QUERY = "how do I feed a sourdough starter"
TEXTS = ["feed the starter flour and water daily", "the river bank flooded", "a starter is wild yeast",
         "interest rates on a bank loan"]


@pytest.fixture(scope="module")
def queue(start_worker: StartWorker, tiny_model: Path) -> str:
    return start_worker("--model", str(tiny_model)).queue


@pytest.fixture(scope="module")
def scores(tiny_model: Path) -> list[float]:
    return [float(s) for s in CrossEncoder(str(tiny_model), device="cpu").predict([(QUERY, t) for t in TEXTS])]


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def test_the_langchain_compressor_keeps_the_best_with_their_metadata_and_score(queue: str,
                                                                              scores: list[float]) -> None:
    documents = [Document(page_content=t, metadata={"source": f"doc-{i}"}, id=str(i)) for i, t in enumerate(TEXTS)]
    compressor = RerankqCompressor(top_n=2, queue=queue)
    for kept in (compressor.compress_documents(documents, QUERY),
                 asyncio.run(compressor.acompress_documents(documents, QUERY))):
        want = best_first(scores)[:2]
        assert [d.page_content for d in kept] == [TEXTS[i] for i in want]
        assert [d.metadata["source"] for d in kept] == [f"doc-{i}" for i in want]
        assert [d.id for d in kept] == [str(i) for i in want]
        np.testing.assert_allclose([d.metadata["relevance_score"] for d in kept], [scores[i] for i in want],
                                   atol=1e-5)
    assert "relevance_score" not in documents[0].metadata  # the caller's documents are not changed
    assert compressor.compress_documents([], QUERY) == []


def test_the_llamaindex_postprocessor_reranks_nodes_best_first(queue: str, scores: list[float]) -> None:
    nodes = [NodeWithScore(node=TextNode(text=t, id_=str(i)), score=0.0) for i, t in enumerate(TEXTS)]
    rerank = RerankqRerank(top_n=3, queue=queue)
    for kept in (rerank.postprocess_nodes(nodes, query_str=QUERY),
                 asyncio.run(rerank.apostprocess_nodes(nodes, query_bundle=QueryBundle(QUERY)))):
        want = best_first(scores)[:3]
        assert [n.node.node_id for n in kept] == [str(i) for i in want]
        assert all(n.score is not None for n in kept)
        np.testing.assert_allclose([float(n.score or 0) for n in kept], [scores[i] for i in want], atol=1e-5)
    with pytest.raises(BadJob, match="needs the query"):
        rerank.postprocess_nodes(nodes)
