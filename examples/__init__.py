"""Runnable examples: `uvicorn examples.rerank_api:app`."""
