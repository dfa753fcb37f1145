"""rerankq: distributed cross-encoder reranking on Celery + Redis.

The public API::

    from rerankq import rerank, arerank, submit_many, Result, RerankError

``rerank`` blocks, ``arerank`` is awaited, ``submit_many`` sends a bulk run; each job's ``Result`` carries
its scores. Every error rerankq raises is a ``RerankError``. The Celery task itself is
``rerankq.tasks.rerank`` (wire name ``rerankq.rerank``), on rerankq's own app, ``rerankq.tasks.app``.

Names are loaded on first use, so that ``import rerankq`` (and the ``rerankq`` command) reads no settings and
builds no Celery app until one is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rerankq.producer.bulk import submit_many
    from rerankq.producer.client import arerank, rerank
    from rerankq.tasks.errors import (
        BadJob,
        ConfigError,
        DeadlineExceeded,
        ModelLoadError,
        RankerFailed,
        RedisFull,
        RerankError,
        RerankTimeout,
        UnknownModel,
    )
    from rerankq.tasks.records import Result

__version__ = "0.1.0"

_HOMES = {
    "rerank": "rerankq.producer.client",
    "arerank": "rerankq.producer.client",
    "submit_many": "rerankq.producer.bulk",
    "Result": "rerankq.tasks.records",
    **dict.fromkeys(["RerankError", "BadJob", "ConfigError", "DeadlineExceeded", "ModelLoadError", "RankerFailed",
                     "RedisFull", "RerankTimeout", "UnknownModel"], "rerankq.tasks.errors"),
}

__all__ = ["BadJob", "ConfigError", "DeadlineExceeded", "ModelLoadError", "RankerFailed", "RedisFull",
           "RerankError", "RerankTimeout", "Result", "UnknownModel", "arerank", "rerank", "submit_many"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rerankq' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
