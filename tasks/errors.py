"""Every error rerankq raises on purpose. Each message says what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterator


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or during, down the chain (libraries wrap a Redis error in their
    own: kombu's ``OperationalError``, redis-py's ``ConnectionError`` around an ``ssl.SSLError``)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


class RerankError(Exception):
    """Root of rerankq's errors: ``except RerankError`` catches all of them."""


class ConfigError(RerankError):
    """A setting is missing or out of range; the message names the environment variable."""


class UnknownModel(RerankError):
    """A caller named a model this deployment does not serve; the message lists the ones it does. Raised before
    anything is queued."""

    def __init__(self, message: str, served: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.served = served


class Misrouted(RerankError):
    """The job reached a queue that the worker's RERANKQ_MODELS gives to another model than the one its producer
    sent it to: the processes of the deployment disagree on the models (set the same RERANKQ_MODELS in each)."""


class BadJob(RerankError):
    """The job's input is malformed; only that job fails, with this message."""


class DeadlineExceeded(RerankError):
    """The job's ``deadline`` passed before a worker could score it."""


class ModelLoadError(RerankError):
    """A ranker's model could not be loaded; the worker exits with this message."""


class RankerFailed(RerankError):
    """The model raised while scoring this job (after isolating it from its batch-mates)."""


class DeviceLost(RerankError):
    """The GPU is in an error state no process can leave (a device-side assert, an illegal memory access): the
    jobs of the batch that hit it fail with this message, the worker puts its other jobs back and exits for a
    restart."""


class RerankTimeout(RerankError):
    """No result arrived in time: are workers running on the job's queue?"""


class RedisFull(RerankError):
    """Redis is at its ``maxmemory`` and refuses new jobs: drain the queues or raise the limit."""
