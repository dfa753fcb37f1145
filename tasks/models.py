"""The models a deployment serves, by name: each with its own queue (and bulk lane), fallback and aliases.

``RERANKQ_MODELS`` lists them; the first is the default, which callers get when they name none. Empty (the
default), the deployment serves one model, ``RERANKQ_MODEL``, on ``RERANKQ_GPU_QUEUE``, named as given
(``BAAI/bge-reranker-v2-m3``, what answers said before models had names) and by its short name
(``bge-reranker-v2-m3``). Producers resolve a name
here before anything is queued (``UnknownModel`` lists the served names); workers find the model they serve
and its queue; the watchdog judges each model's queue apart. Every process of a deployment sets the same.

Two ways to write it: ``name=hub-id-or-path`` pairs, comma-separated
(``bge=BAAI/bge-reranker-v2-m3,minilm=cross-encoder/ms-marco-MiniLM-L6-v2``), or JSON (inline, or a file whose
path ends in ``.json``): a list of objects with ``name`` and, optionally, ``model`` (default: the name),
``aliases``, ``queue``, ``fallback``, ``kind``, ``instruction`` (an LLM reranker's default), ``high_wait_s`` and
``low_wait_s`` (its own watchdog marks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rerankq.tasks.errors import ConfigError, UnknownModel

#: A served name: what callers send as ``model`` (a hub id's ``/`` included); its queue's name is made from it.
NAME = re.compile(r"[A-Za-z0-9._/][A-Za-z0-9._/:-]{0,255}")
FIELDS = ("name", "model", "aliases", "queue", "fallback", "kind", "instruction", "high_wait_s", "low_wait_s")
#: What a model is: found from its config (a causal LM is an LLM reranker), or said.
KINDS = ("", "cross-encoder", "llm")


@dataclass(frozen=True)
class ServedModel:
    #: What callers send as ``model``, and what each answer's ``model`` says.
    name: str
    #: The hub id or local path its workers load.
    path: str
    #: Its interactive lane; the bulk lane is this with ``RERANKQ_BULK_SUFFIX``.
    queue: str
    #: The queue of the fast ranker its new jobs are shed to while its queue is over its marks; empty: none
    #: (passthrough, if on, else they keep queueing).
    fallback: str
    #: Other names callers may use for it (its hub id, an older name).
    aliases: tuple[str, ...] = ()
    #: ``KINDS``: empty, from its config.
    kind: str = ""
    #: An LLM reranker's instruction for jobs that send none (empty: its recipe's own).
    instruction: str = ""
    #: Its own watchdog marks (None: RERANKQ_HIGH_WAIT_S / RERANKQ_LOW_WAIT_S): a slow model's callers may wait
    #: longer than a fast one's before its jobs are shed.
    high_wait_s: float | None = None
    low_wait_s: float | None = None

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Models:
    """The served models, the default first. ``unknown_to_default``: a name not served goes to the default model
    instead of being refused (RERANKQ_UNKNOWN_MODEL=default, for clients that send a name of their own)."""

    models: tuple[ServedModel, ...]
    unknown_to_default: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("RERANKQ_MODELS lists no model: name at least one, or leave it empty for RERANKQ_MODEL")
        _unique("name or alias", [name for m in self.models for name in m.names()])
        _unique("queue", [m.queue for m in self.models], " (give one of them its own \"queue\")")
        fallbacks = {m.fallback for m in self.models}
        for m in self.models:
            if m.queue in fallbacks:
                raise ConfigError(f"RERANKQ_MODELS: {m.name!r}'s queue {m.queue!r} is also a fallback queue: "
                                  "the fast ranker and a model cannot share a queue")

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a caller named (by served name or alias); the default for None; ``UnknownModel`` naming
        the served ones otherwise."""
        if name is None:
            return self.default
        for model in self.models:
            if name in model.names():
                return model
        if self.unknown_to_default:
            return self.default
        shown = repr(name[:100]) if isinstance(name, str) else f"a {type(name).__name__}"
        raise UnknownModel(f"model {shown} is not served here; served: {', '.join(self.names)} (omit model for "
                           f"{self.default.name}; a client that must send a name of its own: add it to the model's "
                           "aliases in RERANKQ_MODELS, or set RERANKQ_UNKNOWN_MODEL=default)", self.names)

    def find(self, name_or_path: str) -> ServedModel | None:
        """The model with this served name, alias or path, if any."""
        for model in self.models:
            if name_or_path in (*model.names(), model.path):
                return model
        return None

    def for_worker(self, model: str, served_name: str | None, queues: Sequence[str] = ()) -> ServedModel:
        """What ``rerankq worker --model MODEL [--served-name NAME] [--queue Q]`` serves: the served model it names
        (by name, alias or path; ``--served-name`` picks it and ``--model`` then only says where to load it from),
        or, naming none, the one whose queue ``--queue`` is (else the default). A model not listed is served under
        its own name on ``--queue``, or on the default model's queue when the deployment serves only that one (as
        before models had names); with several, it must be named. A queue of another served model is refused:
        its callers would get this model's scores."""
        owners = {owner for owner in map(self.by_queue, queues) if owner is not None}
        if served_name is not None:
            try:
                named = self.resolve_strictly(served_name)
            except UnknownModel as exc:
                raise ConfigError(f"--served-name: {exc}") from None
            entry = replace(named, path=model or named.path)
        elif not model:
            entry = next(iter(owners)) if len(owners) == 1 else self.default
        else:
            found = self.find(model)
            if found is None and not (queues or len(self.models) == 1):
                raise ConfigError(f"--model {model!r} is none of the served models ({', '.join(self.names)}; "
                                  "RERANKQ_MODELS): add --served-name NAME to serve it as one of them, or --queue")
            entry = found or replace(self.default, name=model, path=model, aliases=())
        # A model not listed may take the default's queue only where the default is all that is served.
        ad_hoc_alone = self.find(entry.name) is None and len(self.models) == 1
        others = [] if ad_hoc_alone else sorted(o.name for o in owners if o.name != entry.name)
        if others:
            raise ConfigError(f"--queue: {', '.join(q for q in queues if self.by_queue(q) is not None)} is the queue "
                              f"of {', '.join(others)} (RERANKQ_MODELS), not of {entry.name}: its callers would get "
                              f"this model's scores. Leave out --queue, or name that model")
        return entry

    def resolve_strictly(self, name: str) -> ServedModel:
        """``resolve``, refusing a name not served whatever RERANKQ_UNKNOWN_MODEL says."""
        return replace(self, unknown_to_default=False).resolve(name)

    def by_queue(self, queue: str) -> ServedModel | None:
        return next((m for m in self.models if m.queue == queue), None)

    @property
    def fallbacks(self) -> list[str]:
        """The distinct fast-ranker queues the models shed to."""
        return list(dict.fromkeys(m.fallback for m in self.models if m.fallback))


def short_name(path: str) -> str:
    """A served name for a hub id or path: its last part (``BAAI/bge-reranker-v2-m3`` -> ``bge-reranker-v2-m3``),
    with characters a name cannot hold replaced."""
    last = path.rstrip("/").rsplit("/", 1)[-1] or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", last).lstrip("._-")[:64]
    return name or "model"


def parse(spec: str, default_path: str, gpu_queue: str, cpu_queue: str, bulk_suffix: str,
          unknown_to_default: bool = False) -> Models:
    """The registry ``RERANKQ_MODELS=spec`` describes (see the module's doc); empty: ``default_path`` alone."""
    spec = spec.strip()
    if not spec:
        short = short_name(default_path)
        aliases = (short,) if short != default_path else ()
        return Models((ServedModel(default_path, default_path, gpu_queue, cpu_queue, aliases),), unknown_to_default)
    if spec.startswith(("[", "{")):
        entries = _json(spec, "RERANKQ_MODELS")
    elif spec.endswith(".json"):
        try:
            text = Path(spec).read_text()
        except OSError as exc:
            raise ConfigError(f"RERANKQ_MODELS={spec!r}: cannot read it ({exc.strerror or exc})") from None
        entries = _json(text, spec)
    else:
        entries = [_pair(item) for item in spec.split(",") if item.strip()]
    models = [_model(entry, i, gpu_queue, cpu_queue, bulk_suffix) for i, entry in enumerate(entries)]
    return Models(tuple(models), unknown_to_default)


def _json(text: str, where: str) -> list[Any]:
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: a JSON list of models, each {{\"name\": ..., \"model\": ...}}")
    return entries


def _pair(item: str) -> dict[str, Any]:
    name, sep, path = item.strip().partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"RERANKQ_MODELS: {item.strip()!r} is not name=hub-id-or-path")
    return {"name": name.strip(), "model": path.strip()}


def _model(entry: Any, index: int, gpu_queue: str, cpu_queue: str, bulk_suffix: str) -> ServedModel:
    where = f"RERANKQ_MODELS, model {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an object with a \"name\", got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} must be 1-256 letters, digits, '.', '_', '/', ':' or '-', "
                          "not starting with ':' or '-' (aliases may be anything)")
    path = _text(entry.get("model", name), f"{where} ({name}): model")
    derived = gpu_queue if index == 0 else f"{gpu_queue}.{short_name(name)}"
    queue = _text(entry.get("queue") or derived, f"{where}: queue")
    if queue.endswith(bulk_suffix):
        raise ConfigError(f"{where}: queue {queue!r} ends in RERANKQ_BULK_SUFFIX={bulk_suffix!r}, which names a "
                          "bulk lane: rename the model or give it a queue")
    fallback = entry.get("fallback", cpu_queue)
    fallback = "" if fallback is None else _text(fallback, f"{where}: fallback", empty=True)
    if fallback.endswith(bulk_suffix):
        raise ConfigError(f"{where}: fallback {fallback!r} ends in RERANKQ_BULK_SUFFIX={bulk_suffix!r}, which names a "
                          "bulk lane: shed jobs would wait behind bulk runs there")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{where} ({name}): aliases must be a list of names")
    kind = _text(entry.get("kind", ""), f"{where} ({name}): kind", empty=True)
    if kind not in KINDS:
        raise ConfigError(f"{where} ({name}): kind {kind!r} is not 'cross-encoder' or 'llm' (or leave it out: the "
                          "model's config says)")
    instruction = _text(entry.get("instruction", ""), f"{where} ({name}): instruction", empty=True)
    high, low = (_seconds(entry.get(mark), f"{where} ({name}): {mark}") for mark in ("high_wait_s", "low_wait_s"))
    return ServedModel(name, path, queue, fallback, tuple(aliases), kind, instruction, high, low)


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where} must be a number of seconds above 0, got {value!r}")
    return float(value)


def _text(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or empty):
        raise ConfigError(f"{where} must be a{'' if empty else ' non-empty'} string, got {value!r}")
    return value


def _unique(what: str, values: Sequence[str], advice: str = "") -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"RERANKQ_MODELS: {what} {value!r} is given twice{advice}")
        seen.add(value)
