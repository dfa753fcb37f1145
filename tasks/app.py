"""The Celery app producers and workers share, configured from rerankq's settings and nothing else.

It never becomes the process's default app: a web app that imports rerankq keeps its own ``current_app``
and ``shared_task``, and rerankq reads no module of the caller's (such as its ``celeryconfig``) and none of the
``CELERY_BROKER_URL``-style variables the caller's own app may be configured by. The settings are read when the
app's configuration is first used, not on import, so a bad ``RERANKQ_*`` variable ends a command with its message
(``rerankq.cli.main``) rather than a traceback from an import.
"""

from __future__ import annotations

from typing import Any, ClassVar

from celery import Celery
from celery.app.utils import Settings
from celery.loaders.app import AppLoader


class _OwnSettings(Settings):  # type: ignore[misc]
    """Celery's settings of rerankq's app: Celery reads ``CELERY_BROKER_URL``, ``CELERY_BROKER_READ_URL``,
    ``CELERY_BROKER_WRITE_URL`` and ``CELERY_RESULT_BACKEND`` from the environment ahead of an app's own
    configuration, so a web app configured by them would send rerankq's jobs to its own broker."""

    @property
    def broker_url(self) -> Any:
        return self.first("broker_url", "broker_host")

    @property
    def broker_read_url(self) -> Any:
        return self.get("broker_read_url") or self.broker_url

    @property
    def broker_write_url(self) -> Any:
        return self.get("broker_write_url") or self.broker_url

    @property
    def result_backend(self) -> Any:
        return self.first("result_backend", "CELERY_RESULT_BACKEND")


def _configuration() -> dict[str, Any]:
    from rerankq.celeryconfig import celery_config, settings

    return celery_config(settings)


class Loader(AppLoader):  # type: ignore[misc]
    """Celery's app loader (its default one, CELERY_LOADER=default, would import CELERY_CONFIG_MODULE, by default a
    module named celeryconfig, the caller's), with rerankq's result backends: through the sentinels (tasks/sentinel.py),
or a Redis whose connections leave it once it is demoted (tasks/primary.py)."""

    override_backends: ClassVar[dict[str, str]] = {"sentinel": "rerankq.tasks.sentinel:SentinelBackend",
                                                   "redis": "rerankq.tasks.primary:Backend",
                                                   "rediss": "rerankq.tasks.primary:Backend"}


app = Celery("rerankq", loader=Loader, amqp="rerankq.tasks.sentinel:AMQP", set_as_current=False)
# Celery takes no settings class: give its settings object this one (its attribute writes are config keys, hence
# object.__setattr__). Celery swaps the object's contents once configured, and keeps the object.
object.__setattr__(app._conf, "__class__", _OwnSettings)
app.add_defaults(_configuration)
