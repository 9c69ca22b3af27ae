"""What the text families (causal-lm, sequence-classification) share: rows of text, a tokenizer
(given, a version's, or a byte-level BPE trained on the run's corpus), token-id batches."""

from __future__ import annotations

CONTENT = "text"
UNIT = "tokens"
PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json")


def fresh_preprocessor(config, train_rows, out_dir: str) -> None:
    """A byte-level BPE trained on up to model.tokenizer_train_rows of the run's texts."""
    from lifelong.data import text_iterator
    from lifelong.models import train_tokenizer

    train_tokenizer(text_iterator(train_rows, config.model.tokenizer_train_rows), config.model.vocab_size, out_dir)


def load_preprocessor(ref):
    from lifelong.models import load_tokenizer

    return load_tokenizer(ref)


def batch_dtypes():
    import torch

    return torch.long


def model_inputs(batch, dtype, augment=None) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def batch_units(batch) -> int:
    return int(batch["attention_mask"].sum())
