"""`model.task: sequence-classification`: a text classifier (fine-tuned from a pretrained
checkpoint), served as labels and probabilities (`/v1/predict`), continually trained with
holdout-accuracy gates, exported to ONNX with a gated int8 variant."""

from __future__ import annotations

import numpy as np

from lifelong.tasks.classify import (  # noqa: F401  (the classifier half of the contract)
    GATE_METRICS,
    HOLDOUT_METRIC,
    backend,
    comparable,
    confusion,
    grown_from,
    loss_weight,
    metrics,
    model_labels,
    predictions,
    probabilities,
    probabilities_problem,
    scored,
    serving_model,
)

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

NAME = "sequence-classification"
LABELLED = True
PRETRAINS = False
JOB = "finetune"
CONTINUAL = True
MOE = ()
LORA = {"task_type": "SEQ_CLS"}  # PEFT trains and saves the head (score, classifier) whole beside the adapters
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")
EXPORT_ON_REGISTER = True
ENDPOINT = "/v1/predict"
reference_metrics = None  # answers are labels, not generated text
SMOKE_TEXTS = ["a smoke test before this version serves", "ok"]


def check(config) -> None:
    m, d = config.model, config.data
    if d is None:
        return
    if not d.label_column or not d.labels:
        raise ValueError(
            f"model.task is {NAME} but data.label_column or data.labels is missing: "
            "set both (e.g. data.label_column=label, data.labels=[neg, pos])"
        )
    if not m.init_from and not m.tokenizer:
        raise ValueError(f"a {NAME} model needs model.init_from (a pretrained checkpoint) or model.tokenizer (a tokenizer directory)")


def claims(architectures: list[str]) -> bool:
    return any("SequenceClassification" in a for a in architectures)


def tokenize(batch, tokenizer, max_length: int, pack: bool = False) -> dict[str, np.ndarray]:
    """Rows (text, label) as padded model inputs; Arrow in, NumPy out (no pandas on the way).
    A continual cycle's `replayed` marks travel along, for the loop's weights and distillation."""
    from lifelong.data import REPLAYED, cached_tokenizer

    tok = cached_tokenizer(tokenizer)
    enc = tok(batch.column("text").to_pylist(), truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    out = {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "labels": batch.column("label").to_numpy().astype(np.int64),
    }
    if REPLAYED in batch.column_names:
        out[REPLAYED] = batch.column(REPLAYED).to_numpy().astype(np.int64)
    return out


def auto_class():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def build(cfg, tokenizer, init_dir=None, labels=None):
    """A classifier over `labels`: its body from `init_dir` (a new head, or its own grown where
    `labels` extends its label set), else fresh from the config."""
    from lifelong.errors import ConfigError
    from lifelong.models import fresh_config

    assert labels, "classification needs labels"
    label_kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": tokenizer.pad_token_id,
    }
    if init_dir is None:
        return auto_class().from_config(fresh_config(cfg, tokenizer, **label_kwargs))
    try:
        if grown := grown_from(auto_class(), init_dir, labels):  # the same classes and new ones: the old head kept
            return grown
        return auto_class().from_pretrained(str(init_dir), use_safetensors=True, **label_kwargs)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot start a {len(labels)}-label classifier from {init_dir}: {e}") from None


def score(model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    logits = model(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"])).logits
    return scored(logits, torch.as_tensor(batch["labels"]))


def smoke_test(model) -> str | None:
    return probabilities_problem(model, SMOKE_TEXTS)


def predicted(model, model_dir, table, max_length: int) -> tuple[list[int], list[float]]:
    """Its predicted class and confidence per row of a table (content, ...): what continual.trigger=drift compares."""
    from lifelong.tasks.classify import predicted_classes

    return predicted_classes(tokenize, score, CONTENT, model, model_dir, table, max_length)


def holdout_counts(model, model_dir, table, max_length: int) -> dict[str, list[int]]:
    """Its answers on a continual window's holdout (content, label name), per class."""
    from lifelong.tasks.classify import count_by_class

    return count_by_class(tokenize, score, CONTENT, model, model_dir, table, max_length)
