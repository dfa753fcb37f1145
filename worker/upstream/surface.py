"""Every kombu and Celery internal rerankq relies on, and every piece of their code it copies or overrides,
in one table: a library upgrade that moves one fails ``tests/test_compat.py``, naming it, and a worker
refuses to start without an internal it relies on (or warns, where only copied code changed), instead of
an ``AttributeError`` in the middle of a receive.

``RELIED_ON`` entries are ``module:Class.attribute`` (on the class), ``module:Class().attribute`` (set on
each instance by ``__init__``) or ``module:name``. ``COPIED`` entries are fingerprints of the library code
that rerankq's code repeats or replaces, for each version it was read against: a version whose code
differs must be read again before its fingerprint is added (and the supported range widened).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import textwrap
from typing import Any

from rerankq.tasks.errors import ConfigError

logger = logging.getLogger(__name__)

#: The versions rerankq is tested with: at least the first, below the second (pyproject.toml says the same).
SUPPORTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {"celery": ((5, 6), (5, 8)),
                                                                  "kombu": ((5, 7), (5, 8))}

_TRANSPORT = "worker/upstream/transport.py"
_ACKS = "worker/upstream/acks.py"
_PATCHES = "worker/upstream/patches.py"
_STRATEGY = "worker/upstream/strategy.py"
_RESULTS = "worker/upstream/results.py"
_KEYS = "tasks/connections.py"
_SENTINEL = "tasks/sentinel.py"
_PRIMARY = "tasks/primary.py"

#: What rerankq uses that is not kombu's or Celery's public API, and where.
RELIED_ON: dict[str, str] = {
    "kombu.transport:TRANSPORT_ALIASES": f"{_TRANSPORT} for_url: the `rerankq` alias, for redis+socket:// URLs",
    "kombu.transport.virtual:Channel.from_transport_options": f"{_TRANSPORT}: the worker's owner and bulk limit",
    "kombu.connection:Connection()._initial_params": f"{_SENTINEL} Connection.switch: the transport class given",
    "celery.app.amqp:AMQP.Connection": f"{_SENTINEL} AMQP: the app's connections keep rerankq's transport",
    "kombu.transport.redis:SentinelChannel.connection_class": f"{_SENTINEL}: connections that leave a former master",
    "redis.retry:Retry.get_retries": f"{_SENTINEL}: a connection without retries retries a master's move once",
    "redis.sentinel:SentinelConnectionPool.master_address": f"{_SENTINEL}: the master a pool's connections reach",
    "redis.sentinel:SentinelConnectionPool().sentinel_manager": f"{_SENTINEL}: the sentinels a pool asks",
    "redis.sentinel:Sentinel().sentinels": f"{_SENTINEL}: which sentinels, to ask once per set",
    "redis.connection:AbstractConnection()._connect_callbacks": f"{_SENTINEL}: a pub/sub connection is not moved "
                                                                 "quietly",
    "celery.backends.redis:SentinelBackend._get_sentinel_instance": f"{_SENTINEL}: the backend's connections too",
    "celery.loaders.base:BaseLoader.override_backends": "tasks/app.py: rerankq's Sentinel and Redis result backends",
    "kombu.transport.redis:Channel.connection_class": f"{_PRIMARY}: connections that leave a demoted server",
    "kombu.transport.redis:Channel.connection_class_ssl": f"{_PRIMARY}: the same, over TLS",
    "celery.backends.redis:RedisBackend._params_from_url": f"{_PRIMARY}: the result backend's connection class",
    "redis.sentinel:SentinelConnectionPool.get_master_address": f"{_SENTINEL}: asks the sentinels, closes idle "
                                                                 "connections to a former master",
    "celery.app.utils:Settings.first": "tasks/app.py: rerankq's app reads no CELERY_BROKER_URL",
    "kombu.transport.redis:Channel._brpop_start": f"{_TRANSPORT}: overridden, sends BLMOVE or the lanes script",
    "kombu.transport.redis:Channel._brpop_read": f"{_TRANSPORT}: overridden, reads and records what moved",
    "kombu.transport.redis:Channel._flush_brpop_reauth": f"{_TRANSPORT} _brpop_read, as kombu's own does",
    "kombu.transport.redis:Channel._in_poll": f"{_TRANSPORT}: the connection a receive is outstanding on",
    "kombu.transport.redis:Channel._q_for_pri": f"{_TRANSPORT}, {_KEYS}: a queue's Redis list",
    "kombu.transport.redis:Channel._do_restore_message": f"{_KEYS} restore: a reclaimed job back in its queue",
    "kombu.transport.redis:Channel.priority_steps": f"{_TRANSPORT}, {_KEYS}",
    "kombu.transport.redis:Channel.global_keyprefix": f"{_TRANSPORT}, {_KEYS}: every key rerankq names",
    "kombu.transport.redis:Channel().brpop_timeout": f"{_TRANSPORT}: how long an idle receive blocks",
    "kombu.transport.redis:Channel.conn_or_acquire": f"{_KEYS} restore; {_TRANSPORT} _size",
    "kombu.transport.redis:Channel._queue_bind": f"{_TRANSPORT}: a binding a full Redis refused is skipped",
    "kombu.transport.redis:QoS.unacked_key": f"{_TRANSPORT}, {_KEYS}: kombu's unacked hash",
    "kombu.transport.redis:QoS.unacked_index_key": f"{_TRANSPORT}, {_KEYS}: kombu's unacked index",
    "kombu.transport.redis:QoS._remove_from_indices": f"{_TRANSPORT}, {_KEYS}",
    "kombu.transport.redis:QoS.can_consume_max_estimate": f"{_ACKS}, {_TRANSPORT}: how many jobs a receive may take",
    "kombu.transport.redis:QoS.can_consume": f"{_ACKS}: overridden, counts jobs carried over a reconnect",
    "kombu.transport.redis:Channel._disconnect_pools": f"{_ACKS} QoS.restore_unacked",
    "kombu.transport.redis:QoS.restore_unacked": f"{_PATCHES}: patched; {_ACKS}: overridden, keeps what "
                                                 "the chunk consumer serves across a reconnect",
    "kombu.transport.virtual:Channel().closed": f"{_ACKS}, worker/settle.py: a job received before a reconnect",
    "kombu.transport.redis:QoS.restore_visible": f"{_PATCHES}: patched, skipped while Redis is full",
    "kombu.transport.redis:QoS.ack": f"{_PATCHES}: patched; {_ACKS}: acked in Redis in one round trip",
    "kombu.transport.redis:QoS.reject": f"{_PATCHES}: patched",
    "kombu.transport.virtual:Channel.Message": f"{_TRANSPORT}: the channel's messages are Delivery",
    "kombu.message:Message._state": f"{_ACKS} Delivery.reject: left REJECTED as kombu's reject leaves it",
    "kombu.transport.redis:QoS.append": f"{_PATCHES}: patched; {_ACKS}: recorded by the receive",
    "kombu.transport.virtual:QoS()._delivered": f"{_ACKS}, {_TRANSPORT}, {_PATCHES}: the jobs a channel holds",
    "kombu.transport.virtual:QoS()._dirty": f"{_ACKS}, {_TRANSPORT}: held jobs already acked",
    "kombu.transport.virtual:Transport._deliver": f"{_TRANSPORT}: hands a received job to its consumer",
    "celery.worker.request:create_request_cls": f"{_STRATEGY}",
    "celery.worker.strategy:hybrid_to_proto2": f"{_STRATEGY}",
    "celery.worker.strategy:proto1_to_proto2": f"{_STRATEGY}",
    "celery.worker.state:revoked": f"{_STRATEGY}",
    "celery.worker.state:task_reserved": f"{_STRATEGY}",
    "celery.worker.state:task_accepted": "worker/runner.py: a job's first forward batch",
    "celery.worker.state:task_ready": "worker/settle.py: a job settled or put back",
    "celery.backends.base:Backend._get_result_meta": f"{_RESULTS}: the result record Celery would write",
    "celery.events.dispatcher:EventDispatcher()._group_buffer": f"{_PATCHES} flush_task_events",
    "celery.events.event:group_from": f"{_PATCHES} route_task_events",
    "celery.worker.heartbeat:Heart._send": f"{_PATCHES} bound_heartbeat_retries: sent with retry=True, no policy",
}

#: Library code that rerankq repeats or replaces: where, and its fingerprint per version read against it.
COPIED: dict[str, tuple[str, dict[str, str]]] = {
    "kombu.transport.redis:Channel._brpop_start": (
        f"{_TRANSPORT} Channel._brpop_start", {"kombu 5.7.0": "8de199424eb77724"}),
    "kombu.transport.redis:Channel._brpop_read": (
        f"{_TRANSPORT} Channel._brpop_read", {"kombu 5.7.0": "cf6e7a3c978ccf4b"}),
    "kombu.transport.redis:Channel._size": (
        f"{_TRANSPORT} Channel._size: without the MULTI a full Redis refuses", {"kombu 5.7.0": "6004f14873ceb509"}),
    "kombu.transport.redis:QoS.append": (
        f"{_TRANSPORT} Channel._record: kombu's unacked record, written by the receive",
        {"kombu 5.7.0": "bdc5ddeaeea754cc"}),
    "kombu.transport.redis:QoS.ack": (
        f"{_ACKS} ack_in_redis: the Redis side of an ack, for many jobs", {"kombu 5.7.0": "c657a6451d3caea8"}),
    "kombu.transport.virtual:QoS.can_consume": (
        f"{_ACKS} QoS.can_consume: the same test, on the estimate", {"kombu 5.7.0": "35a6812a8f07a6a5"}),
    "kombu.transport.virtual:QoS.can_consume_max_estimate": (
        f"{_ACKS} QoS.can_consume_max_estimate: kombu's, less what is carried",
        {"kombu 5.7.0": "74a7bc23dc124048"}),
    "kombu.message:Message.ack": (
        f"{_ACKS} Delivery.ack: the state kombu's ack leaves", {"kombu 5.7.0": "0b28dc8374c8da1e"}),
    "kombu.message:Message.reject": (
        f"{_ACKS} Delivery.reject: a requeue put back by Channel.put_back instead",
        {"kombu 5.7.0": "bc4dcbe8e8427eb0"}),
    "kombu.transport.redis:QoS.restore_by_tag": (
        f"{_KEYS} BrokerRedis.restore: kombu's restore, with a check", {"kombu 5.7.0": "1373b798f9fc648b"}),
    "kombu.transport.redis:QoS.restore_unacked": (
        f"{_PATCHES} survive_redis_outage: when it cannot run", {"kombu 5.7.0": "c15fc0a5178b0c81"}),
    "kombu.transport.virtual:QoS.restore_unacked_once": (
        f"{_ACKS} QoS.restore_unacked: what a closing channel calls, once", {"kombu 5.7.0": "7496e5d6ab9be617"}),
    "celery.worker.strategy:default": (
        f"{_STRATEGY} receiver: up to the point Celery runs the task",
        {"celery 5.6.3": "1679d6978c40d18b", "celery 5.7.0": "b2439c6d0f6c8627"}),
    "celery.events.dispatcher:EventDispatcher.flush": (
        f"{_PATCHES} route_task_events and flush_task_events",
        {"celery 5.6.3": "0fa62836a62496a1", "celery 5.7.0": "f25ceb44f8787ff3"}),
    "celery.backends.base:Backend._get_result_meta": (
        f"{_RESULTS} record: the result record, without result_extended",
        {"celery 5.6.3": "1f79ebc9fe47a7f3", "celery 5.7.0": "661935347b7aa9e8"}),
    "celery.backends.redis:RedisBackend.set": (
        f"{_RESULTS} store and announce: SETEX then PUBLISH, pipelined",
        {"celery 5.6.3": "6853329e9c1afe98", "celery 5.7.0": "68c8912e93ed13d0"}),
}


def fingerprint(obj: Any) -> str:
    return code_fingerprint(inspect.getsource(obj))


def code_fingerprint(source: str) -> str:
    """A hash of the code in ``source``, docstrings and comments left out (a release that only rewords them
    is the same code)."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def _resolve(entry: str) -> Any:
    """The object ``entry`` names (None for an instance attribute); raises AttributeError or ImportError where
    it is gone."""
    module_name, _, path = entry.partition(":")
    class_path, instance, attribute = path.partition("().")
    obj: Any = importlib.import_module(module_name)
    for part in class_path.split("."):
        obj = getattr(obj, part)
    if instance:
        inits = "".join(inspect.getsource(k.__init__) for k in obj.__mro__ if "__init__" in vars(k)
                        and k.__module__ != "builtins")
        if f"self.{attribute} =" not in inits:
            raise AttributeError(f"{obj.__name__}() no longer sets {attribute}")
        return None
    return obj


def _version(package: str) -> tuple[int, int]:
    module = importlib.import_module(package)
    major, minor = (int(part) for part in module.__version__.split(".")[:2])
    return major, minor


def problems() -> tuple[list[str], list[str]]:
    """What is wrong with the installed kombu and Celery, one line each: (what rerankq cannot run with: a
    version outside the supported range, an internal gone; what it was not written against: copied code
    that changed, or that cannot be read where the libraries ship without their sources)."""
    fatal, changed = [], []
    for package, (low, high) in SUPPORTED.items():
        version = importlib.import_module(package).__version__
        if not low <= _version(package) < high:
            fatal.append(f"{package} {version} is not a version rerankq supports (>={low[0]}.{low[1]},"
                         f"<{high[0]}.{high[1]}): install one that is")
    for entry, where in RELIED_ON.items():
        try:
            _resolve(entry)
        except (AttributeError, ImportError) as exc:
            fatal.append(f"{entry} is gone ({exc}); {where} relies on it")
        except (OSError, TypeError) as exc:  # an instance attribute, with no source to look in
            changed.append(f"{entry} cannot be checked ({exc}); {where} relies on it")
    for entry, (where, prints) in COPIED.items():
        package = entry.split(".")[0]
        version = f"{package} {importlib.import_module(package).__version__}"
        try:
            seen = fingerprint(_resolve(entry))
        except (AttributeError, ImportError):
            continue  # said above, if relied on; else the fingerprint's entry names what is gone
        except (OSError, TypeError) as exc:
            changed.append(f"{entry} cannot be read ({exc}); {where} copies it")
            continue
        if seen not in prints.values():
            changed.append(f"{entry} in {version} is not the code {where} was written against "
                           f"({', '.join(prints)}): read it again, then add {version!r}: {seen!r}")
    return fatal, changed


def check() -> None:
    """Before a worker connects: raise ``ConfigError`` if it cannot run with the installed kombu and Celery;
    warn about copied code that differs from what rerankq was written against (the tests fail on it)."""
    fatal, changed = problems()
    if changed:
        logger.warning("kombu/Celery code rerankq copies differs from what it was written against:\n  %s",
                       "\n  ".join(changed))
    if fatal:
        raise ConfigError("the installed kombu/Celery lack what rerankq relies on:\n  " + "\n  ".join(fatal))
