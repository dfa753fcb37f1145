"""``rerankq serve``: the rerank HTTP API (Cohere's, Jina's and text-embeddings-inference's shapes) in front
of the queues: ``create_app`` makes the FastAPI app, ``main.run_serve`` runs it under uvicorn."""
