"""The Celery app producers and workers share, configured from ``celeryconfig``."""

from __future__ import annotations

from celery import Celery

app = Celery("rerankq")
app.config_from_object("celeryconfig")
