"""The client side: ``rerank()`` / ``await arerank()`` for web apps, ``submit_many()`` for bulk runs."""

from rerankq.producer.bulk import submit_many
from rerankq.producer.client import arerank, rerank

__all__ = ["arerank", "rerank", "submit_many"]
