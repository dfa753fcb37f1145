"""Every rerankq setting, in one typed place, each overridable from an environment variable.

rerankq's code reads ``settings``; its Celery app is configured from ``celery_config(settings)`` (Celery's own
names) and from nothing else. ``rerankq config`` prints the table the README carries. Installed, this module is
``rerankq.celeryconfig``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_type_hints
from urllib.parse import parse_qs, urlsplit

from rerankq.tasks.errors import ConfigError
from rerankq.tasks.models import Models
from rerankq.tasks.models import parse as parse_models
from rerankq.tasks.records import LONG_DOCS
from rerankq.tasks.secrets import masked, masked_url, with_password

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"


def _env(name: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": name, "doc": doc})


#: Settings whose value no message shows (``Settings.__repr__``), and those that are URLs with a password.
SECRETS, URLS = ("serve_api_key", "redis_password"), ("broker_url", "result_backend")


@dataclass(frozen=True, repr=False)
class Settings:
    broker_url: str = _env("RERANKQ_BROKER_URL", "redis://localhost:6379/0",
                           "Redis URL of the job queues (`redis://`, `redis+socket://`, or `rediss://` for TLS: "
                           "the server's certificate is verified, against `?ssl_ca_certs=/path/ca.pem` if given), "
                           "or the sentinels of a Redis Sentinel deployment, `;`-separated: "
                           "`sentinel://h1:26379;sentinel://h2:26379`. Redis Cluster is not supported (kombu's "
                           "Redis transport cannot use one).")
    result_backend: str = _env("RERANKQ_RESULT_BACKEND", "",
                               "Redis URL (or `sentinel://` URLs) for result keys; empty means the broker URL.")
    sentinel_master: str = _env("RERANKQ_SENTINEL_MASTER", "mymaster",
                                "With `sentinel://` URLs: the name the sentinels know the master by.")
    key_prefix: str = _env("RERANKQ_KEY_PREFIX", "",
                           "Prefix of every key this deployment keeps in Redis: queues, unacked jobs, events "
                           "and control (kombu's `global_keyprefix`), results, and rerankq's own keys, so that "
                           "several deployments, or rerankq and other Celery apps, share one Redis. Ends in "
                           "`:`; every process of a deployment sets the same.")
    gpu_queue: str = _env("RERANKQ_GPU_QUEUE", "rerank.gpu", "Queue served by cross-encoder workers.")
    cpu_queue: str = _env("RERANKQ_CPU_QUEUE", "rerank.cpu", "Queue served by fast-ranker workers.")
    visibility_timeout: int = _env("RERANKQ_VISIBILITY_TIMEOUT", 3600,
                                   "Seconds before an unacked job is redelivered (broker and backend alike).")
    result_expires: int = _env("RERANKQ_RESULT_EXPIRES", 3600, "Seconds a result key lives.")
    max_docs: int = _env("RERANKQ_MAX_DOCS", 1000, "Most docs one job may carry.")
    max_job_bytes: int = _env("RERANKQ_MAX_JOB_BYTES", 16 * 1024 * 1024,
                              "Largest job a producer sends (its JSON arguments); a larger one is refused there.")
    max_chunk_tokens: int = _env("RERANKQ_MAX_CHUNK_TOKENS", 16384,
                                 "Tokens (real, counted with the model's tokenizer) of the jobs a worker scores "
                                 "at once, its window: each forward batch is picked from the window's pairs.")
    max_batch_tokens: int = _env("RERANKQ_MAX_BATCH_TOKENS", 0,
                                 "Padded tokens in one forward batch (bounds activation memory); 0 means, on a "
                                 "GPU, what half its memory free after the warm-up holds (at most 32768; 8192 if "
                                 "unmeasured), and 2048 on a CPU, where larger batches run slower per pair "
                                 "(BENCHMARKS.md). After an out-of-memory error the worker lowers it to half the "
                                 "batch that ran out.")
    max_chunk_jobs: int = _env("RERANKQ_MAX_CHUNK_JOBS", 64, "Most jobs in a worker's window.")
    target_batch_ms: float = _env("RERANKQ_TARGET_BATCH_MS", 15.0,
                                  "Forward batches are sized from the measured cost per batch to take about "
                                  "this long (a job that arrives joins the next batch, so it waits for the one "
                                  "running), within max_batch_tokens; twice this while the device is over 90% "
                                  "busy, and full batches for a lane with a backlog. Larger means fewer batches "
                                  "per job (lower latency at light load), longer queue waits. 0: no target.")
    max_wait_ms: float = _env("RERANKQ_MAX_WAIT_MS", 10.0,
                              "Longest an idle worker waits for received jobs still being tokenized before "
                              "its first forward batch; with none in sight it starts at once.")
    prefetch: int = _env("RERANKQ_PREFETCH", 0,
                         "Jobs a worker holds unacked, both lanes together; bulk jobs take at most this minus "
                         "max_chunk_jobs, so interactive ones always find room. 0 means 3 x max_chunk_jobs; "
                         "the least allowed is 2 x max_chunk_jobs.")
    bulk_suffix: str = _env("RERANKQ_BULK_SUFFIX", ".bulk",
                            "A queue's bulk lane is the queue's name with this suffix (`rerank.gpu.bulk`): "
                            "`rerankq submit` and `submit_many` send there, workers serve it after the "
                            "interactive lane, and the watchdog never sheds it.")
    model: str = _env("RERANKQ_MODEL", DEFAULT_MODEL,
                      "Cross-encoder: a hub id or a local path. Served under its last part's name "
                      "(`bge-reranker-v2-m3`) unless RERANKQ_MODELS lists the models.")
    unknown_model: str = _env("RERANKQ_UNKNOWN_MODEL", "refuse",
                              "A request naming a model not served: `refuse` (`UnknownModel`; `rerankq serve` answers "
                              "404 with the served names), or `default` (the default model answers it, its answer "
                              "saying so in `model`: for clients that send a name of their own, as a Cohere client "
                              "sends `rerank-v3.5`; an alias does the same for one name).")
    models: str = _env("RERANKQ_MODELS", "",
                       "Several models, each on its own queue, callers picking one by `model`: "
                       "`name=hub-id-or-path` pairs, comma-separated, the first the default (on "
                       "RERANKQ_GPU_QUEUE, the others on `<RERANKQ_GPU_QUEUE>.<name>`); or JSON, inline or a "
                       "`.json` file, for aliases, queues and fallbacks (README, \"Several models\"). Empty: "
                       "RERANKQ_MODEL alone.")
    fast_model: str = _env("RERANKQ_FAST_MODEL", "",
                           "Fast-ranker bi-encoder; empty means the bundled all-MiniLM-L6-v2.")
    backend: str = _env("RERANKQ_BACKEND", "torch",
                        "Cross-encoder runtime of CPU workers: `torch`, or `onnx-int8` (ONNX Runtime with "
                        "int8 weights: about 2x torch, scores a little off; BENCHMARKS.md; needs "
                        "`pip install 'rerankq[onnx]'`). GPU workers run torch in fp16.")
    dtype: str = _env("RERANKQ_DTYPE", "auto",
                      "Number format of the torch models (cross-encoder and fast ranker): `auto` is fp16 on CUDA "
                      "(bf16 for an LLM reranker on a GPU that has it), bf16 on a CPU with native bf16 "
                      "(avx512_bf16 or AMX; about 2x fp32, scores within about 0.01, BENCHMARKS.md), else fp32; "
                      "or `fp32`, `bf16`, `fp16` (CUDA only). The ONNX "
                      "backend ignores it. The worker logs its choice and why; `rerankq status` shows it.")
    max_length: int = _env("RERANKQ_MAX_LENGTH", 512,
                           "Cross-encoder tokens per (query, doc) pair; longer docs are truncated. Capped by the "
                           "model's own limit; 0 means that limit.")
    long_docs: str = _env("RERANKQ_LONG_DOCS", "truncate",
                          "A doc longer than the model reads beside its query (RERANKQ_MAX_LENGTH): `truncate` "
                          "(its end is cut), `truncate-left` (its start is cut), `split` (overlapping windows, "
                          "each scored as a pair in the same forward batches, the doc taking its best window's "
                          "score), or `refuse` (the job fails with BadJob). A job's `long_docs` overrides it.")
    max_windows: int = _env("RERANKQ_MAX_WINDOWS", 8,
                            "With `split`: most windows of one doc, from its start (the rest is not read).")
    window_overlap: int = _env("RERANKQ_WINDOW_OVERLAP", 64,
                               "With `split`: tokens each window shares with the next (at most half a window), so "
                               "a passage cut by a window's edge is whole in one of them.")
    poll_ms: float = _env("RERANKQ_POLL_MS", 200.0,
                          "How often the watchdog measures the queues (and workers report their figures).")
    high_wait_s: float = _env("RERANKQ_HIGH_WAIT_S", 2.0,
                              "Shed: route new jobs off a queue whose estimated wait is above this.")
    low_wait_s: float = _env("RERANKQ_LOW_WAIT_S", 0.5,
                             "Return: route new jobs back once the estimated wait is at or below this.")
    high_jobs: int = _env("RERANKQ_HIGH_JOBS", 0, "Shed also when a queue's backlog is above this many jobs; "
                                                  "0 means off.")
    low_jobs: int = _env("RERANKQ_LOW_JOBS", 0, "With RERANKQ_HIGH_JOBS: return only once the backlog is at "
                                                "or below this many jobs.")
    route_ttl_s: float = _env("RERANKQ_ROUTE_TTL_S", 2.0,
                              "Life of the route state the watchdog refreshes; without a watchdog, routing "
                              "falls back to the GPU queue after this.")
    route_cache_ms: float = _env("RERANKQ_ROUTE_CACHE_MS", 100.0,
                                 "How long a producer reuses the route state it read (one Redis read per refresh).")
    passthrough: bool = _env("RERANKQ_PASSTHROUGH", True,
                             "When both queues are over their marks, return the retrieval order at once "
                             "(`ranker: passthrough`) instead of queueing.")
    serve_timeout_s: float = _env("RERANKQ_SERVE_TIMEOUT_S", 30.0,
                                  "`rerankq serve`: longest a request waits for its result before a 504 (it is "
                                  "also the job's deadline: workers skip it after that).")
    serve_max_body_bytes: int = _env("RERANKQ_SERVE_MAX_BODY_BYTES", 8 * 1024 * 1024,
                                     "`rerankq serve`: largest request body; a larger one is answered 413 unread.")
    serve_read_timeout_s: float = _env("RERANKQ_SERVE_READ_TIMEOUT_S", 30.0,
                                       "`rerankq serve`: a request (headers and body) must arrive within this of "
                                       "its first byte (of the connection opening, for the first); else it is "
                                       "answered 408 and the connection closed (slow clients cannot hold "
                                       "connections).")
    serve_max_connections: int = _env("RERANKQ_SERVE_MAX_CONNECTIONS", 2048,
                                      "`rerankq serve`: open connections at most; past it new requests get 503 at "
                                      "once.")
    max_query_chars: int = _env("RERANKQ_MAX_QUERY_CHARS", 10_000,
                                "Longest query (characters) a job may carry: `serve` answers 422, a producer raises "
                                "BadJob before sending, a worker fails such a job with BadJob unscored.")
    max_doc_chars: int = _env("RERANKQ_MAX_DOC_CHARS", 50_000,
                              "`rerankq serve`: longest document (characters) a request may carry; 422 above.")
    serve_overload: str = _env("RERANKQ_SERVE_OVERLOAD", "degrade",
                               "`rerankq serve` while the GPU queue is over its marks: `degrade` answers from the "
                               "fast ranker, then in retrieval order (flagged in `meta`); `reject` answers 429 "
                               "with Retry-After, for clients that prefer to retry.")
    serve_api_key: str = _env("RERANKQ_SERVE_API_KEY", "",
                              "`rerankq serve`: when set, rerank requests need `Authorization: Bearer <key>` "
                              "(401 without); `/health` and `/metrics` stay open.")
    socket_timeout_s: float = _env("RERANKQ_SOCKET_TIMEOUT_S", 5.0,
                                   "Every Redis connection of every rerankq process (jobs, results, rerankq's own "
                                   "keys): a connect, read or write that takes longer fails and the next try takes "
                                   "a new connection; TCP keepalive on. A Redis gone silent (its host down, a "
                                   "failover) costs a request one timeout and a worker one reconnect, never a "
                                   "thread for good. A worker's blocking receive waits at most 1 s at a time, "
                                   "well within it.")
    health_check_s: float = _env("RERANKQ_HEALTH_CHECK_S", 10.0,
                                 "A connection idle this long is checked (`PING`) before its next command, and a "
                                 "worker drops a receive whose answer is this much overdue (kombu's check): a "
                                 "dead receiving connection is noticed within twice this, plus 1 s. 0 turns the "
                                 "checks off.")
    tracing: str = _env("RERANKQ_TRACING", "",
                        "OpenTelemetry traces of jobs from `rerankq worker` and `rerankq serve`: `otlp` (the "
                        "OTLP/HTTP exporter, set up by the standard `OTEL_EXPORTER_OTLP_*` variables), `console` "
                        "(one JSON line per span on stderr), or empty for none. Needs "
                        "`pip install 'rerankq[tracing]'`.")
    metrics_port: int = _env("RERANKQ_METRICS_PORT", 9808,
                             "First port of a cross-encoder worker's Prometheus `/metrics`; the fast ranker starts "
                             "10 above, the watchdog 20 above. A port in use moves to the next free one (of 10), "
                             "said in the log and `rerankq status`; 0 means none.")
    metrics_address: str = _env("RERANKQ_METRICS_ADDRESS", "127.0.0.1",
                                "Interface the workers' and the watchdog's `/metrics` listen on: this machine "
                                "only unless set (`0.0.0.0` where Prometheus scrapes from elsewhere, as in "
                                "compose).")
    redis_password: str = _env("RERANKQ_REDIS_PASSWORD", "",
                               "Password of the Redis (and its replicas) of RERANKQ_BROKER_URL and "
                               "RERANKQ_RESULT_BACKEND, for URLs that carry none: given apart, it needs no "
                               "percent-encoding (`/`, `#`, `@` are common in generated passwords).")

    def __post_init__(self) -> None:
        if self.redis_password:  # into the URLs, as if written there (encoded), so every client gets it
            for name in URLS:
                object.__setattr__(self, name, with_password(getattr(self, name), self.redis_password))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value < 0:
                raise ConfigError(f"{f.metadata['env']} must be >= 0, got {value}")
        for name in ("max_docs", "max_job_bytes", "max_chunk_tokens", "max_chunk_jobs",
                     "visibility_timeout", "result_expires", "poll_ms", "high_wait_s", "route_ttl_s",
                     "serve_timeout_s", "serve_max_body_bytes", "max_doc_chars", "max_query_chars", "max_windows",
                     "socket_timeout_s", "serve_read_timeout_s", "serve_max_connections"):
            if getattr(self, name) == 0:
                raise ConfigError(f"{_env_of(name)} must be > 0")
        if self.socket_timeout_s < 1:
            raise ConfigError(f"RERANKQ_SOCKET_TIMEOUT_S={self.socket_timeout_s} must be at least 1: a worker's "
                              "blocking receive waits up to 1 s for its answer")
        if self.prefetch and self.prefetch < 2 * self.max_chunk_jobs:
            raise ConfigError(
                f"RERANKQ_PREFETCH={self.prefetch} cannot hold twice the window of RERANKQ_MAX_CHUNK_JOBS="
                f"{self.max_chunk_jobs}: set it to at least {2 * self.max_chunk_jobs}, or to 0 for that")
        for low, high in (("low_wait_s", "high_wait_s"), ("low_jobs", "high_jobs")):
            low_mark, high_mark = getattr(self, low), getattr(self, high)
            if high_mark and low_mark >= high_mark:  # a high mark of 0 is off (jobs only; wait must be > 0)
                raise ConfigError(
                    f"{_env_of(low)}={low_mark} must be below {_env_of(high)}={high_mark}: "
                    "the gap between the marks keeps the route from flapping")
        if self.route_ttl_s * 1000 <= self.poll_ms:
            raise ConfigError(
                f"RERANKQ_ROUTE_TTL_S={self.route_ttl_s} must outlast one poll (RERANKQ_POLL_MS={self.poll_ms}), "
                "or the route state expires between the watchdog's refreshes")
        if self.key_prefix and not self.key_prefix.endswith(":"):
            raise ConfigError(f"RERANKQ_KEY_PREFIX={self.key_prefix!r} must end in ':' (e.g. "
                              f"{self.key_prefix + ':'!r}), so that its keys read apart from the next deployment's")
        if not self.bulk_suffix:
            raise ConfigError("RERANKQ_BULK_SUFFIX must not be empty: it tells a bulk lane from its queue")
        if self.long_docs not in LONG_DOCS:
            raise ConfigError(f"RERANKQ_LONG_DOCS={self.long_docs!r}: use one of {', '.join(map(repr, LONG_DOCS))}")
        if self.tracing not in ("", "otlp", "console"):
            raise ConfigError(f"RERANKQ_TRACING={self.tracing!r}: use 'otlp', 'console', or nothing")
        if self.serve_overload not in ("degrade", "reject"):
            raise ConfigError(f"RERANKQ_SERVE_OVERLOAD={self.serve_overload!r}: use 'degrade' or 'reject'")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"RERANKQ_DTYPE={self.dtype!r}: use 'auto', 'fp32', 'bf16' or 'fp16'")
        if self.models.strip() and self.model != DEFAULT_MODEL:
            raise ConfigError("RERANKQ_MODEL and RERANKQ_MODELS are both set: with RERANKQ_MODELS, its first model is "
                              "the default; unset RERANKQ_MODEL")
        for model in self.served:  # a bad RERANKQ_MODELS fails here, at start, not at a caller's first job
            high_s, low_s = model.high_wait_s or self.high_wait_s, model.low_wait_s or self.low_wait_s
            if low_s >= high_s:
                raise ConfigError(f"RERANKQ_MODELS: {model.name}'s low wait mark {low_s:g} s must be below its high "
                                  f"mark {high_s:g} s (the deployment's, RERANKQ_*_WAIT_S, unless it sets its own)")
        if self.unknown_model not in ("refuse", "default"):
            raise ConfigError(f"RERANKQ_UNKNOWN_MODEL={self.unknown_model!r}: use 'refuse' or 'default'")
        if self.backend not in ("torch", "onnx-int8"):
            raise ConfigError(f"RERANKQ_BACKEND={self.backend!r}: use 'torch' or 'onnx-int8'")
        for name in ("broker_url", "backend_url"):
            url = getattr(self, name)
            if "cluster" in url.split("://", 1)[0]:
                raise ConfigError(f"{_env_of(name)}={masked_url(url)!r}: Redis Cluster is not supported (kombu's Redis "
                                  "transport cannot use one); use one Redis, or Redis Sentinel for failover")
            if sentinel(url) and "ssl" in url:
                raise ConfigError(f"{_env_of(name)}: TLS with Redis Sentinel is not supported yet (the connections "
                                  "would go unencrypted); use `rediss://` to one Redis, or Sentinel without TLS")
            if not url.startswith(("redis://", "rediss://", "redis+socket://", "unix://", "sentinel://")):
                raise ConfigError(f"{_env_of(name)}={masked_url(url)!r} is not a Redis URL: rerankq runs on Redis")

    def __repr__(self) -> str:
        def shown(name: str, value: Any) -> Any:
            return masked(value) if name in SECRETS else masked_url(value) if name in URLS else value

        return f"Settings({', '.join(f'{f.name}={shown(f.name, getattr(self, f.name))!r}' for f in fields(self))})"

    @functools.cached_property
    def served(self) -> Models:
        """The models this deployment serves, by name (tasks/models.py)."""
        return parse_models(self.models, self.model, self.gpu_queue, self.cpu_queue, self.bulk_suffix,
                            self.unknown_model == "default")

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def batch_tokens(self, device: str, fits: int | None = None) -> int:
        """The forward-batch budget on ``device``: as set, else what a GPU's free memory ``fits`` (measured at the
        warm-up), else 8192 on a GPU and 2048 on a CPU."""
        return self.max_batch_tokens or fits or (8192 if device.startswith("cuda") else 2048)

    @property
    def prefetch_count(self) -> int:
        return self.prefetch or 3 * self.max_chunk_jobs

    @property
    def bulk_limit(self) -> int:
        """Bulk jobs a worker holds at most: the rest of its prefetch is kept for interactive ones."""
        return self.prefetch_count - self.max_chunk_jobs

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            kind = hints[f.name]
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw) if kind is not str else raw
            except ValueError:
                raise ConfigError(f"{f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery's ``broker_transport_options`` for these settings."""
    return {
        "visibility_timeout": settings.visibility_timeout,
        # kombu scans for the unacked jobs of dead workers every interval x throttle seconds (100 s by
        # default, whatever the timeout): scan every tenth of the timeout instead (1-10 s), so a killed
        # worker's jobs come back soon after the timeout. The scan is one indexed ZRANGE under a mutex.
        "unacked_restore_interval": min(10, max(1, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
        # One Redis list per queue: workers receive with BLMOVE, which takes one source
        # (worker/upstream/transport.py). rerankq sends no priorities.
        "priority_steps": [0],
        **_prefixed(settings),
        **_timeouts(settings),
        **_sentinel(settings, settings.broker_url),
    }


def sentinel(url: str) -> bool:
    """Whether ``url`` names the sentinels of a Redis Sentinel deployment."""
    return url.startswith("sentinel://")


def _sentinel(settings: Settings, url: str) -> dict[str, Any]:
    """kombu's and Celery's transport options for a ``sentinel://`` URL: the master's name, and the sentinels'
    own connections timed out and not retried (redis-py retries each 10 times; one hung sentinel held every
    new connection about a minute before the next sentinel was asked)."""
    if not sentinel(url):
        return {}
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    seconds = settings.socket_timeout_s
    return {"master_name": settings.sentinel_master,
            "sentinel_kwargs": {"socket_timeout": seconds, "socket_connect_timeout": seconds,
                                "retry": Retry(NoBackoff(), 0)}}


def _timeouts(settings: Settings) -> dict[str, Any]:
    """redis-py's and kombu's names for the connection timeouts and health checks."""
    return {"socket_timeout": settings.socket_timeout_s, "socket_connect_timeout": settings.socket_timeout_s,
            "socket_keepalive": True, "health_check_interval": settings.health_check_s}


def backend_options(settings: Settings) -> dict[str, Any]:
    """Celery's ``result_backend_transport_options`` for these settings."""
    return {"visibility_timeout": settings.visibility_timeout, **_prefixed(settings),
            **_sentinel(settings, settings.backend_url)}


def transport(url: str) -> str | None:
    """kombu's transport for ``url``, by its class's path; None for a Unix socket, one server (kombu's own)."""
    if sentinel(url):
        return "rerankq.tasks.sentinel:SentinelTransport"
    return "rerankq.tasks.primary:Transport" if url.startswith(("redis://", "rediss://")) else None


def verified(url: str) -> str:
    """``url``, with the server's certificate checked when it is ``rediss://`` and says nothing on that.

    Given a bare ``rediss://`` URL, kombu connects without checking the certificate (``CERT_NONE``, one log
    line) and Celery's result backend refuses to start; rerankq asks for ``ssl_cert_reqs=required`` for both,
    against the system's CAs or the URL's ``ssl_ca_certs``. An explicit ``ssl_cert_reqs`` is kept.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return url
    return parts._replace(query="&".join(q for q in (parts.query, "ssl_cert_reqs=required") if q)).geturl()


def _prefixed(settings: Settings) -> dict[str, Any]:
    """kombu's and Celery's own name for the deployment's key prefix, where it has one."""
    return {"global_keyprefix": settings.key_prefix} if settings.key_prefix else {}


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _env_of(name: str) -> str:
    if name == "backend_url":
        return "RERANKQ_RESULT_BACKEND"
    return str({f.name: f.metadata["env"] for f in fields(Settings)}[name])


def settings_table() -> str:
    """The README's configuration table, generated so that it cannot drift from the code."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in fields(Settings):
        rows.append(f"| `{f.metadata['env']}` | `{f.default}` | {f.metadata['doc']} |")
    return "\n".join(rows)


settings = Settings.from_env()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's own settings (its lowercase names) for rerankq's app, derived from ``settings``: Celery gets
    these keys and nothing else, so ``celery inspect conf`` and Flower never see rerankq's own settings (an API
    key among them), and no module that happens to be called ``celeryconfig`` on ``sys.path`` is read."""
    return {
        "broker_url": verified(settings.broker_url),
        # Connections that leave a server no longer the master: the one the sentinels no longer name
        # (tasks/sentinel.py), or one demoted behind its address (tasks/primary.py).
        "broker_transport": transport(settings.broker_url),
        "result_backend": verified(settings.backend_url),
        # JSON only: a pickle message is refused before it reaches any task code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.gpu_queue,
        # Jobs are acked by the chunk consumer after their results are written (see worker/consumer.py).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_transport_options": broker_options(settings),
        "result_backend_transport_options": backend_options(settings),
        # The result backend's connections, as the broker's: a Redis gone silent costs a timeout, not a thread.
        "redis_socket_timeout": settings.socket_timeout_s,
        "redis_socket_connect_timeout": settings.socket_timeout_s,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": settings.health_check_s,
        "result_expires": settings.result_expires,
        # The worker runs one consumer process (solo pool), so the multiplier is the prefetch count itself.
        "worker_prefetch_multiplier": settings.prefetch_count,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
    }
