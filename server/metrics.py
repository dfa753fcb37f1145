"""The Prometheus metrics ``rerankq serve`` exports on its own ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """A registry per app, so that apps made in one process (tests) keep their counts apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rerankq_http_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=self.registry)
        self.seconds = Histogram("rerankq_http_request_seconds", "From a request's arrival to its answer, by route.",
                                 ["route"], buckets=_SECONDS, registry=self.registry)
        self.in_flight = Gauge("rerankq_http_requests_in_flight", "Requests being answered.", registry=self.registry)
        self.answers = Counter("rerankq_http_answers", "Rerank answers by the ranker that gave them: cross-encoder, "
                               "fast (shed), passthrough (retrieval order).", ["ranker"], registry=self.registry)
