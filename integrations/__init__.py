"""rerankq in the RAG frameworks, each an optional extra: a LangChain document compressor
(``integrations.langchain``, ``pip install 'rerankq[langchain]'``) and a LlamaIndex node postprocessor
(``integrations.llama_index``, ``pip install 'rerankq[llamaindex]'``). Both send their jobs as any
producer does (``producer.rerank``/``arerank``): routed, shed and timed out the same way."""
