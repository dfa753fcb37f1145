"""The simulated GPU: a ranker that costs device time and no CPU, for benchmarks and tests."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.rankers import DEVICE_ERROR, Encoded, Launched, Ranker, Row


class SimulatedRanker(Ranker):
    """A stand-in for a GPU, for benchmarks and tests: each forward batch takes ``latency_ms`` plus ``token_us``
    per padded token of device time and no CPU. As on a GPU, ``launch`` returns at once and ``read`` waits
    for the device, which runs one batch at a time. Tokens are words; the score is the share of the query's
    words found in the doc. ``--model 'latency_ms=20,token_us=5'`` sets the costs.

    Faults to inject: ``fail_on=WORD`` raises on any batch holding a doc with that word; ``nan_on=WORD`` scores
    such a doc NaN, as a model that overflowed would; ``device_error_on=WORD`` raises the CUDA error a
    device-side assert gives, when the scores are read; ``oom_above=N`` runs out of memory on any batch over N
    padded tokens. ``trace=PATH`` appends a line per step of each batch to PATH ("prepare|launch|read N
    <monotonic seconds>"), to check what overlaps; ``record=PATH`` a JSON line per batch launched with the docs it
    scored, to check what ran.
    """

    kind = "simulated"

    def __init__(self, spec: str, max_length: int = 0) -> None:
        self.model = spec or "simulated"
        self.max_length = max_length or 512
        options: dict[str, float | str] = {"latency_ms": 10.0, "token_us": 5.0, "oom_above": 0.0, "fail_on": "",
                                           "nan_on": "", "device_error_on": "", "trace": "", "record": ""}
        for part in filter(None, (spec or "").split(",")):
            name, _, value = (p.strip() for p in part.partition("="))
            try:
                default = options[name]
                options[name] = value if isinstance(default, str) else float(value)
            except (KeyError, ValueError):
                raise ModelLoadError(f"the simulated ranker takes 'latency_ms=<ms>,token_us=<us>' (and optionally "
                                     f"fail_on=<word>, nan_on=<word>, device_error_on=<word>, oom_above=<tokens>, "
                                     f"trace=<path>, record=<path>), got {spec!r}") from None
        self._latency_s = float(options["latency_ms"]) / 1000
        self._token_s = float(options["token_us"]) / 1_000_000
        self._oom_above = float(options["oom_above"])
        self._fail_on = str(options["fail_on"])
        self._nan_on = str(options["nan_on"])
        self._device_error_on = str(options["device_error_on"])
        self._trace = str(options["trace"])
        self._record = str(options["record"])
        #: When the simulated device finishes the last batch launched (monotonic clock).
        self._free_at = 0.0
        self._batches = itertools.count(1)

    def _tokens(self, query: str, doc: str) -> int:
        return min(self.max_length, len(query.split()) + len(doc.split()) + 3)

    def _log(self, step: str, batch: int) -> None:
        if self._trace:
            with open(self._trace, "a") as trace:
                trace.write(f"{step} {batch} {time.monotonic():.6f}\n")

    def encode(self, query: str, texts: Sequence[str]) -> Encoded:
        return Encoded([self._tokens(query, text) for text in texts], query=query, texts=list(texts))

    def prepare(self, rows: Sequence[Row]) -> Any:
        batch = next(self._batches)
        self._log("prepare", batch)
        return batch, [(encoded.query, encoded.texts[i]) for encoded, i in rows]

    def launch(self, prepared: Any) -> Launched:
        batch, pairs = prepared
        padded = len(pairs) * max((self._tokens(q, d) for q, d in pairs), default=0)
        if self._oom_above and padded > self._oom_above:
            raise MemoryError(f"simulated out of memory: {padded} padded tokens > {self._oom_above:g}")
        if self._fail_on and any(self._fail_on in doc.split() for _, doc in pairs):
            raise RuntimeError(f"simulated model failure on {self._fail_on!r}")
        self._log("launch", batch)
        if self._record:
            with open(self._record, "a") as record:
                record.write(json.dumps({"batch": batch, "docs": [doc for _, doc in pairs]}) + "\n")
        self._free_at = max(time.monotonic(), self._free_at) + self._latency_s + self._token_s * padded
        return Launched((batch, pairs, self._free_at))

    def read(self, launched: Launched) -> list[float]:
        batch, pairs, done_at = launched.output
        time.sleep(max(0.0, done_at - time.monotonic()))
        if self._device_error_on and any(self._device_error_on in doc.split() for _, doc in pairs):
            raise DEVICE_ERROR("CUDA error: device-side assert triggered (simulated)")
        self._log("read", batch)
        scores = []
        for query, doc in pairs:
            words, found = set(query.lower().split()), set(doc.lower().split())
            scores.append(len(words & found) / len(words) if words else 0.0)
            if self._nan_on and self._nan_on in doc.split():
                scores[-1] = float("nan")
        return scores

    def window_budget(self, query: str) -> int:
        return self.max_length - 3 - len(query.split())

    def check_instruction(self, instruction: str | None) -> None:
        pass  # it stands in for any model, an LLM reranker's too

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", doc)]
