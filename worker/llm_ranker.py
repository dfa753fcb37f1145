"""The LLM reranker: a causal language model asked whether a document meets a query, scored by its "yes" and "no"
logits at the last position (the Qwen3-Reranker recipe), fed forward batches padded on the left from the preparer's
token ids like the other torch rankers.

Each pair reads ``PREFIX + "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}" + SUFFIX``, as the
model card formats it. The line before the document is tokenised once per job (``query_read`` returns it); a long
document is cut to what fits beside it, never the prompt: the instruction and query stay whole up to three
quarters of the length, past which the query is cut; an instruction that leaves the query less than an eighth
is refused (``BadJob``). The score is P(yes) = softmax over the two logits, which is
the sigmoid of their difference; that difference is the raw score (``raw_scores``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rerankq.tasks.errors import BadJob, ModelLoadError
from rerankq.worker.rankers import Encoded, Launched, Row
from rerankq.worker.tokens import Tokens
from rerankq.worker.torch_rankers import TorchRanker, loaded_in, text_head, token_offsets

#: Qwen3-Reranker's documented template.
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
          'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: Its default instruction, for a model and a job that give none.
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def head(instruction: str, query: str) -> str:
    """The user's line up to the document (``PREFIX`` before it is tokenised apart, as the recipe does): the
    document follows as ``" " + doc``, so that the two pieces tokenise as the whole line does (a word's leading
    space stays with the word)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"


def is_causal_lm(config: Any) -> bool:
    """A model whose config names a causal-LM architecture: an LLM reranker, not a cross-encoder."""
    return any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or ())


class LlmRanker(TorchRanker):
    kind = "llm"

    def __init__(self, model: str, device: str, max_length: int = 0, dtype: str = "fp32",
                 instruction: str = "") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        # transformers 5 wraps from_pretrained and a model's `to` in decorators that mypy reads as taking a model
        # first: `to` is called as torch's own.
        self._lm = AutoModelForCausalLM.from_pretrained(model, **loaded_in(dtype))  # type: ignore[arg-type]
        torch.nn.Module.to(self._lm, device).eval()
        self._yes, self._no = (_single_token(tokenizer, word, model) for word in ("yes", "no"))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        limit = int(getattr(self._lm.config, "max_position_embeddings", 0) or 8192)
        self.max_length = min(max_length, limit) if max_length else limit
        self.dtype = dtype
        #: The model's default instruction (RERANKQ_MODELS' ``instruction``), for jobs that send none.
        self.instruction = instruction or INSTRUCTION
        super().__init__(device, tokenizer)
        self._left = True  # the last position must be each row's own last token
        self._prefix, self._suffix = self._ids(PREFIX), self._ids(SUFFIX)
        #: Tokens of every pair's prompt besides its instruction, query and document.
        self._frame = len(self._prefix) + len(self._suffix)
        try:  # the default instruction must fit: else every job naming none would fail, blamed on its caller
            self.query_read("")
        except BadJob as exc:
            raise ModelLoadError(f"{model!r}: its default instruction (RERANKQ_MODELS' \"instruction\") is too long: "
                                 f"{exc}") from None

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def query_read(self, query: str, instruction: str | None = None) -> str:
        instruction = self.instruction if instruction is None else instruction
        # The prompt without the query, then as much of the query as leaves a quarter of the length to the doc.
        room = self.max_length * 3 // 4 - len(self._ids(head(instruction, ""))) - self._frame
        if room < self.max_length // 8:  # the instruction alone would crowd out the query
            raise BadJob(f"the instruction and the prompt around it take {self.max_length * 3 // 4 - room} of the "
                         f"{self.max_length} tokens a pair may have (RERANKQ_MAX_LENGTH), leaving the query too few: "
                         "shorten the instruction, or raise RERANKQ_MAX_LENGTH")
        return head(instruction, text_head(self._tokenizer, query, room))

    def check_instruction(self, instruction: str | None) -> None:
        pass  # read: query_read puts it in the prompt

    def window_budget(self, query: str) -> int:
        return self.max_length - len(self._ids(query)) - self._frame

    def encode(self, query: str, texts: Sequence[str]) -> Encoded:
        prompt = self._prefix + self._ids(query)
        budget = max(1, self.max_length - len(prompt) - len(self._suffix))
        docs = self._tokenizer([" " + text for text in texts], add_special_tokens=False, truncation=True,
                               max_length=budget)["input_ids"]
        tokens = Tokens.of({"input_ids": [prompt + list(doc) + self._suffix for doc in docs]}, ())
        return Encoded(tokens.lengths(), tokens)

    def prepare(self, rows: Sequence[Row]) -> Any:
        inputs = self._on_device([(encoded.tokens, i) for encoded, i in rows if encoded.tokens is not None])
        # Each row's positions from 0 at its first real token, as if alone: left padding moves no row's positions.
        mask = inputs["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    def launch(self, prepared: Any) -> Launched:
        events = self._events()
        with torch.inference_mode():
            if events:
                events[0].record()
            # Only the last position's logits, and no key/value cache: a forward batch generates nothing.
            logits = self._lm(**prepared, logits_to_keep=1, use_cache=False).logits[:, -1, :]
            raw = logits[:, self._yes].float() - logits[:, self._no].float()
            if events:
                events[1].record()
        return Launched(raw, events)

    def activate(self, raw: list[float]) -> list[float]:
        # softmax over (no, yes) at the last position, as the recipe scores: the sigmoid of their difference.
        return [float(s) for s in torch.sigmoid(torch.tensor(raw, dtype=torch.float32))]

    def offsets(self, doc: str) -> list[tuple[int, int]]:
        return token_offsets(self._tokenizer, doc)


def _single_token(tokenizer: Any, word: str, model: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ModelLoadError(f"{model!r} is not an LLM reranker of the yes/no kind: {word!r} is not one token of its "
                             "vocabulary")
    return int(ids[0])

