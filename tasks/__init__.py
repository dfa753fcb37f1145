"""The contract between producers and workers: the Celery app, the ``rerank`` task, records, errors."""

from rerankq.tasks.app import app
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
from rerankq.tasks.records import Job, Result
from rerankq.tasks.rerank import TASK_NAME, rerank

__all__ = [
    "TASK_NAME",
    "BadJob",
    "ConfigError",
    "DeadlineExceeded",
    "Job",
    "ModelLoadError",
    "RankerFailed",
    "RedisFull",
    "RerankError",
    "RerankTimeout",
    "Result",
    "UnknownModel",
    "app",
    "rerank",
]
