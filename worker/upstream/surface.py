"""Every kombu and Celery internal rerankq relies on, and every piece of their code it copies or overrides,
in one table: a library upgrade that moves one fails ``tests/test_compat.py`` and each worker's start,
naming it, instead of surfacing as an ``AttributeError`` in the middle of a receive.

``RELIED_ON`` entries are ``module:Class.attribute`` (on the class), ``module:Class().attribute`` (set on
each instance by ``__init__``) or ``module:name``. ``COPIED`` entries are fingerprints of the library code
that rerankq's code repeats or replaces, for each version it was read against: a version whose code
differs must be read again before its fingerprint is added (and the supported range widened).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

from tasks.errors import ConfigError

#: The versions rerankq is tested with: at least the first, below the second (pyproject.toml says the same).
SUPPORTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {"celery": ((5, 6), (5, 8)),
                                                                  "kombu": ((5, 7), (5, 8))}

_TRANSPORT = "worker/upstream/transport.py"
_PATCHES = "worker/upstream/patches.py"
_STRATEGY = "worker/upstream/strategy.py"
_RESULTS = "worker/upstream/results.py"
_KEYS = "tasks/connections.py"

#: What rerankq uses that is not kombu's or Celery's public API, and where.
RELIED_ON: dict[str, str] = {
    "kombu.transport:TRANSPORT_ALIASES": f"{_TRANSPORT} install: redis:// URLs get rerankq's transport",
    "kombu.transport:_transport_cache": f"{_TRANSPORT} install",
    "kombu.transport.redis:Channel._brpop_start": f"{_TRANSPORT}: overridden, sends BLMOVE or the lanes script",
    "kombu.transport.redis:Channel._brpop_read": f"{_TRANSPORT}: overridden, reads and records what moved",
    "kombu.transport.redis:Channel._flush_brpop_reauth": f"{_TRANSPORT} _brpop_read, as kombu's own does",
    "kombu.transport.redis:Channel._in_poll": f"{_TRANSPORT}: the connection a receive is outstanding on",
    "kombu.transport.redis:Channel._q_for_pri": f"{_TRANSPORT}, {_KEYS}: a queue's Redis list",
    "kombu.transport.redis:Channel._do_restore_message": f"{_KEYS} restore: a reclaimed job back in its queue",
    "kombu.transport.redis:Channel.priority_steps": f"{_TRANSPORT}, {_KEYS}",
    "kombu.transport.redis:Channel.global_keyprefix": f"{_TRANSPORT}, {_KEYS}: every key rerankq names",
    "kombu.transport.redis:Channel().brpop_timeout": f"{_TRANSPORT}: how long an idle receive blocks",
    "kombu.transport.redis:Channel.conn_or_acquire": f"{_KEYS} restore",
    "kombu.transport.redis:QoS.unacked_key": f"{_TRANSPORT}, {_KEYS}: kombu's unacked hash",
    "kombu.transport.redis:QoS.unacked_index_key": f"{_TRANSPORT}, {_KEYS}: kombu's unacked index",
    "kombu.transport.redis:QoS._remove_from_indices": f"{_TRANSPORT}, {_KEYS}",
    "kombu.transport.redis:QoS.can_consume_max_estimate": f"{_TRANSPORT}: how many jobs a receive may take",
    "kombu.transport.redis:QoS.restore_unacked": f"{_PATCHES}: patched",
    "kombu.transport.redis:QoS.ack": f"{_PATCHES}: patched; {_TRANSPORT}: acked in Redis in one round trip",
    "kombu.transport.redis:QoS.reject": f"{_PATCHES}: patched",
    "kombu.transport.redis:QoS.append": f"{_PATCHES}: patched; {_TRANSPORT}: recorded by the receive",
    "kombu.transport.virtual:QoS()._delivered": f"{_TRANSPORT}, {_PATCHES}: the jobs a channel holds",
    "kombu.transport.virtual:QoS()._dirty": f"{_TRANSPORT}: held jobs already acked",
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
    "celery.events.dispatcher:EventDispatcher._publish": "tests/test_compat.py: counts what is published",
    "celery.events.event:group_from": f"{_PATCHES} route_task_events",
}

#: Library code that rerankq repeats or replaces: where, and its fingerprint per version read against it.
COPIED: dict[str, tuple[str, dict[str, str]]] = {
    "kombu.transport.redis:Channel._brpop_start": (
        f"{_TRANSPORT} Channel._brpop_start", {"kombu 5.7.0": "06723d707ddf2240"}),
    "kombu.transport.redis:Channel._brpop_read": (
        f"{_TRANSPORT} Channel._brpop_read", {"kombu 5.7.0": "c42518699709f2df"}),
    "kombu.transport.redis:QoS.append": (
        f"{_TRANSPORT} Channel._record: kombu's unacked record, written by the receive",
        {"kombu 5.7.0": "35c655f6ecc62fe6"}),
    "kombu.transport.redis:QoS.ack": (
        f"{_TRANSPORT} ack_in_redis: the Redis side of an ack, for many jobs", {"kombu 5.7.0": "1bc15a4ddf541af6"}),
    "kombu.transport.redis:QoS.restore_by_tag": (
        f"{_KEYS} BrokerRedis.restore: kombu's restore, with a check", {"kombu 5.7.0": "58e161d81b6fe18d"}),
    "kombu.transport.redis:QoS.restore_unacked": (
        f"{_PATCHES} survive_redis_outage: when it cannot run", {"kombu 5.7.0": "8954efef014d546e"}),
    "celery.worker.strategy:default": (
        f"{_STRATEGY} receiver: up to the point Celery runs the task",
        {"celery 5.6.3": "b1378bad36671972", "celery 5.7.0": "7d90575ada5eb1dc"}),
    "celery.events.dispatcher:EventDispatcher.flush": (
        f"{_PATCHES} route_task_events and flush_task_events",
        {"celery 5.6.3": "0992996d30f208a3", "celery 5.7.0": "4e9a6b4ec6a95ddb"}),
    "celery.backends.redis:RedisBackend.set": (
        f"{_RESULTS} store and announce: SETEX then PUBLISH, pipelined",
        {"celery 5.6.3": "03741cb6ffa6ba07", "celery 5.7.0": "807be0ea0213ba59"}),
}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


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


def problems() -> list[str]:
    """What is wrong with the installed kombu and Celery, one line each; empty when all is as read."""
    found = []
    for package, (low, high) in SUPPORTED.items():
        version = importlib.import_module(package).__version__
        if not low <= _version(package) < high:
            found.append(f"{package} {version} is not a version rerankq supports (>={low[0]}.{low[1]},"
                         f"<{high[0]}.{high[1]}): install one that is")
    for entry, where in RELIED_ON.items():
        try:
            _resolve(entry)
        except (AttributeError, ImportError) as exc:
            found.append(f"{entry} is gone ({exc}); {where} relies on it")
    for entry, (where, prints) in COPIED.items():
        package = entry.split(".")[0]
        version = f"{package} {importlib.import_module(package).__version__}"
        try:
            seen = fingerprint(_resolve(entry))
        except (AttributeError, ImportError, OSError, TypeError) as exc:
            found.append(f"{entry} cannot be read ({exc}); {where} copies it")
            continue
        if seen not in prints.values():
            found.append(f"{entry} in {version} is not the code {where} was written against "
                         f"({', '.join(prints)}): read it again, then add {version!r}: {seen!r}")
    return found


def check() -> None:
    """Raise ``ConfigError`` listing every problem, before a worker connects."""
    found = problems()
    if found:
        raise ConfigError("the installed kombu/Celery differ from what rerankq was written against:\n  "
                          + "\n  ".join(found))
