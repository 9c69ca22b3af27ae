"""`model.task: causal-lm`: GPT-style language models, pretrained from scratch on text and
served as continuations (`/v1/generate`). Scored by loss and perplexity over real tokens."""

from __future__ import annotations

import math

import numpy as np

# What every text family shares (the task contract's text half).
from lifelong.tasks.text import (  # noqa: F401
    CONTENT,
    FORWARD_KWARGS,
    PREPROCESSOR_FILES,
    UNIT,
    batch_dtypes,
    batch_units,
    encoder,
    export_inputs,
    fresh_preprocessor,
    load_preprocessor,
    model_inputs,
    parity_groups,
    parity_samples,
)

NAME = "causal-lm"
LABELLED = False
PRETRAINS = True
JOB = "pretrain"
CONTINUAL = False
EXPORT_FORMATS = ("onnx",)
EXPORT_ON_REGISTER = False
ENDPOINT = "/v1/generate"
SMOKE_PROMPT = "a smoke test before this version serves"


def check(config) -> None:
    """Nothing beyond what every config needs: text, and a tokenizer given or trained on it."""


def claims(architectures: list[str]) -> bool:
    return any("CausalLM" in a or "LMHead" in a for a in architectures)


def tokenize(batch, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """Pack the batch's texts (each ended by EOS) into full blocks of max_length tokens."""
    from lifelong.data import cached_tokenizer

    tok = cached_tokenizer(tokenizer)
    ids = tok(batch.column("text").to_pylist(), add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for seq in ids for t in (*seq, tok.eos_token_id)), dtype=np.int64)
    n_blocks = len(stream) // max_length
    blocks = stream[: n_blocks * max_length].reshape(n_blocks, max_length)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}


def auto_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def build(cfg, tokenizer, init_dir=None, labels=None):
    """From `init_dir` weights, else fresh from model.architecture + model.hf_config."""
    from lifelong.models import fresh_config

    if init_dir is not None:
        return auto_class().from_pretrained(str(init_dir), use_safetensors=True)
    return auto_class().from_config(fresh_config(cfg, tokenizer))


def loss_weight(batch) -> int:
    """The model predicts every real token but the first of each row."""
    return int(batch["attention_mask"][:, 1:].sum())


def predictions(logits):
    return None


def probabilities(logits):
    return None


def confusion(labels, preds, num_labels: int):
    return None


def metrics(loss: float, labels=None, preds=None, num_labels: int = 0, probs=None) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def score(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row sums of next-token cross-entropy over real tokens (padding does not count)."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(batch["input_ids"])
    mask = torch.as_tensor(batch["attention_mask"])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    target_mask = mask[:, 1:].float()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return {
        "loss_sum": (ce * target_mask).sum(1).numpy(),
        "count": target_mask.sum(1).numpy(),
        "pred": np.full(len(ids), -1),
        "label": np.full(len(ids), -1),
    }


def comparable(batch, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padded positions are not predictions: only real tokens' logits must agree."""
    keep = batch.attention_mask.astype(bool)
    return a[keep], b[keep]


def backend(configured: str) -> str:
    """Generation runs in PyTorch whatever serve.backend names (the ONNX graph has no KV cache)."""
    return "torch"


def serving_model(model_dir, backend: str, max_length: int | None, threads: int, device: str):
    from lifelong.inference import Generator

    return Generator(model_dir, max_length, threads=threads, device=device)


def smoke_test(model) -> str | None:
    out = model.generate(SMOKE_PROMPT, max_new_tokens=2)
    return None if isinstance(out["text"], str) else f"generate returned {out!r}"
