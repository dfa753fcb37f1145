"""A LangChain document compressor that reranks with rerankq, e.g. under a ``ContextualCompressionRetriever``:

    from rerankq.integrations.langchain import RerankqCompressor
    compressor = RerankqCompressor(top_n=3)
    best = compressor.compress_documents(documents, "how do I feed a sourdough starter")

Each document comes back as a copy with its metadata kept and ``relevance_score`` added, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import BaseDocumentCompressor, Document

from rerankq.producer import arerank, rerank
from rerankq.producer.client import DEFAULT_TIMEOUT_S
from rerankq.tasks.records import Result


class RerankqCompressor(BaseDocumentCompressor):
    #: Documents kept, best first (None: all of them).
    top_n: int | None = 3
    timeout: float = DEFAULT_TIMEOUT_S
    #: A served model's name (the deployment's default if None); a queue to send to instead of letting rerankq's
    #: router pick; ``long_docs`` as a job's.
    model: str | None = None
    queue: str | None = None
    long_docs: str | None = None

    def compress_documents(self, documents: Sequence[Document], query: str, callbacks: Any = None,
                           ) -> Sequence[Document]:
        if not documents:
            return []
        result = rerank(query, [d.page_content for d in documents], top_k=self._top(documents),
                        timeout=self.timeout, queue=self.queue, long_docs=self.long_docs,
                        model=self.model)
        return self._ranked(documents, result)

    async def acompress_documents(self, documents: Sequence[Document], query: str, callbacks: Any = None,
                                  ) -> Sequence[Document]:
        if not documents:
            return []
        result = await arerank(query, [d.page_content for d in documents], top_k=self._top(documents),
                               timeout=self.timeout, queue=self.queue, long_docs=self.long_docs,
                               model=self.model)
        return self._ranked(documents, result)

    def _top(self, documents: Sequence[Document]) -> int:
        return min(self.top_n or len(documents), len(documents))

    def _ranked(self, documents: Sequence[Document], result: Result) -> list[Document]:
        return [Document(page_content=documents[i].page_content, id=documents[i].id,
                         metadata={**documents[i].metadata, "relevance_score": result.scores[i]})
                for i in result.ranked()]
