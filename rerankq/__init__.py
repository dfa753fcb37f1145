"""rerankq: distributed cross-encoder reranking on Celery + Redis."""

__version__ = "0.1.0"
