"""What the text families (causal-lm, sequence-classification) share: rows of text, a tokenizer
(given, a version's, or a byte-level BPE trained on the run's corpus), token-id batches."""

from __future__ import annotations

CONTENT = "text"
UNIT = "tokens"
PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json")
FORWARD_KWARGS = {"use_cache": False}  # logits of the whole input, no KV cache (served and exported alike)
# Parity samples when no validation texts are at hand.
SAMPLE_TEXTS = [
    "The quarterly earnings beat expectations and the shares rose.",
    "A storm front brings heavy rain and strong winds tonight.",
    "ok",
    "The team scored twice in the second half to win the final, and the coach praised the defence "
    "for holding firm under pressure through the closing minutes of a long and tiring match.",
]


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
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def batch_units(batch) -> int:
    return int(batch["attention_mask"].sum())


def encoder(model_dir, max_length: int):
    from lifelong.inference import Encoder

    return Encoder(model_dir, max_length)


def export_inputs(model_dir, max_length: int, padded: bool):
    """Example inputs to trace or export with (a padded row when `padded`), and which of their
    axes stay dynamic: batch and sequence, up to max_length."""
    import torch

    length = min(8, max_length)
    # Two distinct tensors: passing one object for both inputs makes the exporter alias them.
    input_ids = torch.ones(2, length, dtype=torch.long)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        attention_mask[1, length // 2 :] = 0  # as served batches have
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_length)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: seq},
    }


def parity_samples(rows: list[dict] | None) -> list[str]:
    """Texts to compare an export with PyTorch on: validation rows' and a long one, or the samples."""
    return [r["text"] for r in rows[:15]] + [SAMPLE_TEXTS[-1]] if rows else SAMPLE_TEXTS


def parity_groups(samples: list[str]) -> list[list[str]]:
    """One padded batch, one at a time, and a text of one character (one token, for byte-level
    BPE): a traced graph keeps the branches its example inputs took, so other shapes must agree."""
    return [samples, samples[:1], samples[-1:], ["x"]]
