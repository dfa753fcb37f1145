"""Rankers: one small interface (pairs -> scores in forward batches) over the cross-encoder and the fast
bi-encoder (worker/torch_rankers.py), their ONNX variant (worker/onnx_ranker.py) and the simulated GPU
(worker/simulated.py); and loading one.

Import this module only after ``worker.device.pin`` has run: it imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rerankq.tasks.errors import BadJob, ModelLoadError
from rerankq.worker.tokens import Tokens

Pair = tuple[str, str]


@dataclass(eq=False)
class Encoded:
    """A job's pairs as its ranker reads them, made once by the preparer thread (``Ranker.encode``) and only read
    after: by the runner, which pads forward batches from them (``Ranker.prepare``)."""

    #: Tokens each pair costs the model (after truncation): what the window's token budget counts.
    costs: list[int]
    #: Their token ids (worker/tokens.py), for a ranker that tokenises.
    tokens: Tokens | None = None
    #: The query and the texts, for one that reads words (the simulated ranker).
    query: str = ""
    texts: Sequence[str] = ()


#: A pair of a forward batch: one of a job's pairs.
Row = tuple[Encoded, int]


@dataclass
class Launched:
    """A forward batch on its way: on a GPU its kernels queued, not yet done."""

    #: The raw scores as the model gives them (a tensor the device may still be computing).
    output: Any
    #: CUDA events recorded around the forward, read after the scores are (``device_s``).
    events: tuple[Any, Any] | None = None
    #: What the device spent on it, known once ``read`` returned (CUDA events; None elsewhere).
    device_s: float | None = None


class Ranker(ABC):
    """Scores pairs in forward batches, in three steps so that the next batch is padded (and copied to a GPU)
    while one runs: ``prepare`` (CPU work), ``launch`` (starts the forward; on a GPU it returns before the
    device is done) and ``read`` (waits for the scores)."""

    #: What ``Result.ranker`` says: "cross-encoder", "fast" or "simulated".
    kind: str
    #: What ``Result.model`` says: the hub id or path the weights came from.
    model: str
    #: Tokens per pair before truncation.
    max_length: int
    #: The number format it computes in (worker/dtype.py), and where.
    dtype: str = "fp32"
    device: str = "cpu"
    #: The padded tokens a forward batch may hold in the memory left after the warm-up (worker/model.py
    #: ``warm_up``, on a GPU); None: not measured.
    fits_tokens: int | None = None

    @abstractmethod
    def encode(self, query: str, texts: Sequence[str]) -> Encoded:
        """The (query, text) pairs of a job, tokenised once and truncated as the model reads them."""

    @abstractmethod
    def prepare(self, rows: Sequence[Row]) -> Any:
        """One forward batch's inputs from the rows' encoded pairs (padded; on a GPU, on their way to it). The
        caller keeps the batch under the token budget."""

    @abstractmethod
    def launch(self, prepared: Any) -> Launched:
        """Start the forward batch. Out of memory, or a model that fails on its input, raises here."""

    def read(self, launched: Launched) -> list[float]:
        """The batch's scores as the model gives them before any activation (a cross-encoder's logits), once
        the device is done. A CUDA error raised by the forward may surface here."""
        output = launched.output
        if isinstance(output, torch.Tensor):
            output = output.float().cpu()  # upcast on the device, as predict does: bf16 ties broken alike
        if launched.events is not None:
            began, ended = launched.events
            launched.device_s = float(began.elapsed_time(ended)) / 1000  # both recorded: the copy above waited
        return [float(s) for s in output.reshape(-1).tolist()]

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        """Score ``pairs`` in one forward batch (each distinct query's pairs encoded together)."""
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        rows: list[Row | None] = [None] * len(pairs)
        for query, indices in by_query.items():
            encoded = self.encode(query, [pairs[i][1] for i in indices])
            for k, i in enumerate(indices):
                rows[i] = (encoded, k)
        return self.read(self.launch(self.prepare([row for row in rows if row is not None])))

    def activate(self, raw: list[float]) -> list[float]:
        """A job's scores from its raw ones (what a job asking for ``raw_scores`` gets instead)."""
        return raw

    def query_read(self, query: str, instruction: str | None = None) -> str:
        """The part of ``query`` the model can read beside a doc, found once per job: tokenising the whole
        query again for each of its pairs cost a long query's tokenising once per doc. Here: all of it. An LLM
        reranker returns its whole prompt up to the doc, ``instruction`` (None: the model's default) in it."""
        return query

    def check_instruction(self, instruction: str | None) -> None:
        """A job's instruction, where this model reads none: refused (``BadJob``), not silently dropped. The fast
        ranker and the simulated GPU ignore one instead (the one answers shed jobs, the other stands in for any
        model); an LLM reranker reads it."""
        if instruction is not None:
            raise BadJob(f"the {self.kind} model {self.model!r} takes no instruction: send none, or name an LLM "
                         "reranker as the model (GET /v1/models lists the served ones)")

    @abstractmethod
    def window_budget(self, query: str) -> int:
        """Tokens of a doc the model reads beside ``query`` (0 or less: the query alone fills it); a longer
        doc is a long one (``worker/windows.py``)."""

    @abstractmethod
    def offsets(self, doc: str) -> list[tuple[int, int]]:
        """The character range of each of the doc's own tokens (no special tokens)."""


def load_ranker(kind: str, model: str, device: str, max_length: int = 0, backend: str = "torch",
                dtype: str = "fp32", instruction: str = "") -> Ranker:
    """Load a ranker once for this process, or raise ``ModelLoadError`` naming the model and the cause.
    ``backend`` (``RERANKQ_BACKEND``) picks the cross-encoder's runtime on a CPU; ``dtype`` (worker/dtype.py
    ``choose``) the torch models' number format. A ``cross-encoder`` whose config names a causal LM is loaded as
    an LLM reranker (``llm``, worker/llm_ranker.py), with ``instruction`` as its default."""
    name = model or ("all-MiniLM-L6-v2 (bundled)" if kind == "fast" else "")
    if backend != "torch" and kind == "cross-encoder" and device != "cpu":
        raise ModelLoadError(f"RERANKQ_BACKEND={backend} runs the cross-encoder on a CPU, not on {device}: "
                             "GPU workers run torch in fp16 (set RERANKQ_BACKEND=torch for them)")
    # The simulated ranker only stands in for a GPU: it runs anywhere.
    if device.startswith("cuda") and kind != "simulated" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"cannot load the {kind} model {name!r} on {device}: CUDA is not available "
            f"(torch {torch.__version__} sees no GPU); use --device cpu or install a CUDA build of torch")
    from rerankq.worker.simulated import SimulatedRanker
    from rerankq.worker.torch_rankers import CrossEncoderRanker, FastRanker

    try:
        if kind == "cross-encoder" and is_llm(model):
            kind = "llm"
        if kind == "llm":
            from rerankq.worker.llm_ranker import LlmRanker

            return LlmRanker(model, device, max_length, dtype, instruction)
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
    raise ModelLoadError(f"unknown ranker {kind!r}: use 'cross-encoder', 'llm', 'fast' or 'simulated'")


def is_llm(model: str) -> bool:
    """Whether ``model``'s config (a local one, or the hub's as cached) names a causal-LM architecture; a model
    whose config cannot be read here is left to the cross-encoder's load to explain."""
    from transformers import AutoConfig

    from rerankq.worker.llm_ranker import is_causal_lm

    try:
        return is_causal_lm(AutoConfig.from_pretrained(model))
    except Exception:
        return False


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
