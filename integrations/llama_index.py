"""A LlamaIndex node postprocessor that reranks with rerankq, e.g. in a query engine:

    from rerankq.integrations.llama_index import RerankqRerank
    engine = index.as_query_engine(similarity_top_k=20, node_postprocessors=[RerankqRerank(top_n=3)])

Nodes come back best first, each with rerankq's score; the nodes themselves are not copied or changed.
"""

from __future__ import annotations

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from rerankq.producer import arerank, rerank
from rerankq.producer.client import DEFAULT_TIMEOUT_S
from rerankq.tasks.errors import BadJob
from rerankq.tasks.records import Result


class RerankqRerank(BaseNodePostprocessor):
    #: Nodes kept, best first.
    top_n: int = 2
    timeout: float = DEFAULT_TIMEOUT_S
    #: A served model's name (the deployment's default if None); a queue to send to instead of letting rerankq's
    #: router pick; ``long_docs`` as a job's.
    model: str | None = None
    queue: str | None = None
    long_docs: str | None = None

    @classmethod
    def class_name(cls) -> str:
        return "RerankqRerank"

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None,
                           ) -> list[NodeWithScore]:
        if not nodes:
            return []
        result = rerank(self._query(query_bundle), _texts(nodes), top_k=min(self.top_n, len(nodes)),
                        timeout=self.timeout, queue=self.queue, long_docs=self.long_docs,
                        model=self.model)
        return _ranked(nodes, result)

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None,
                                  ) -> list[NodeWithScore]:
        if not nodes:
            return []
        result = await arerank(self._query(query_bundle), _texts(nodes), top_k=min(self.top_n, len(nodes)),
                               timeout=self.timeout, queue=self.queue, long_docs=self.long_docs,
                               model=self.model)
        return _ranked(nodes, result)

    def _query(self, query_bundle: QueryBundle | None) -> str:
        if query_bundle is None:
            raise BadJob("RerankqRerank needs the query: pass query_bundle (or query_str) to postprocess_nodes")
        return str(query_bundle.query_str)


def _texts(nodes: list[NodeWithScore]) -> list[str]:
    # What the other LlamaIndex rerankers score: the content with the metadata meant for embedding.
    return [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]


def _ranked(nodes: list[NodeWithScore], result: Result) -> list[NodeWithScore]:
    return [NodeWithScore(node=nodes[i].node, score=result.scores[i]) for i in result.ranked()]



