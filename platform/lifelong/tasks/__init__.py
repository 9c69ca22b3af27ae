"""Task families: what is particular to each `model.task`, in one module per family.

The loop, the cycle, evaluation, export and serving ask the task (`task(name)`) and never test
its name. Every family module provides the same names (`CONTRACT`); adding a family is a new
module here, its name in `TaskName` and its entry in `TASKS`.

A family module imports nothing heavy at import time: configs and Ray Data tasks import it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal, get_args

from lifelong.errors import LifelongError
from lifelong.tasks import causal_lm, image_classification, masked_image_modeling, text_classification

TaskName = Literal["causal-lm", "sequence-classification", "image-classification", "masked-image-modeling"]
DEFAULT: TaskName = "causal-lm"

TASKS: dict[str, ModuleType] = {
    module.NAME: module for module in (causal_lm, text_classification, image_classification, masked_image_modeling)
}

# What every family module provides (checked by tests/test_tasks.py).
CONTRACT = (
    "NAME",  # its model.task
    "CONTENT",  # what a row holds: "text" or "image" (data.content)
    "UNIT",  # what training throughput counts (train_<UNIT>_per_s): tokens, images
    "PREPROCESSOR_FILES",  # a directory holding one of these is its preprocessor (model.tokenizer)
    "FORWARD_KWARGS",  # extra keyword arguments of every inference forward (no KV cache for text)
    "LABELLED",  # rows carry a label (data.label_column, data.labels)
    "PRETRAINS",  # `lifelong pretrain` trains it from scratch; else `lifelong finetune`
    "JOB",  # the stem of its runs' default names
    "CONTINUAL",  # continual cycles are built for it
    "HOLDOUT_METRIC",  # what its cycles' gates and matrix measure on each holdout: accuracy, perplexity (None: not continual)
    "GATE_METRICS",  # what continual.gates.metric may name for it instead (the default first)
    "MOE",  # the model.architecture names whose model may take DeepSpeed Mixture-of-Experts layers (model.moe); () none
    "LORA",  # how PEFT adapts it (train.lora): LoraConfig settings (task_type, modules_to_save), or None: not adapted
    "EXPORT_FORMATS",  # what `lifelong export` builds for it, in order
    "EXPORT_ON_REGISTER",  # export.on_register=auto exports its new versions
    "ENDPOINT",  # the HTTP route that serves it (None: not served)
    "check",  # (JobConfig) -> None: raises ValueError naming the keys to set
    "claims",  # (HF architecture names) -> bool: a bare HF directory holds this family
    "fresh_preprocessor",  # (JobConfig, train rows, out_dir) -> None: a new tokenizer / image processor saved there
    "load_preprocessor",  # (TokenizerRef or directory) -> the loaded tokenizer / image processor
    "tokenize",  # (Ray Data batch (pyarrow), tokenizer, max_length, pack) -> model inputs (numpy); pack: data.pack
    "batch_dtypes",  # -> iter_torch_batches' dtypes for those inputs
    "model_inputs",  # (torch batch, model dtype, augment: DataConfig | None) -> the forward's kwargs (labels too, where it takes them)
    "batch_units",  # (torch batch) -> how many UNITs it holds
    "build",  # (ModelConfig, tokenizer, init_dir, labels) -> the HF model, trainable
    "auto_class",  # the HF Auto class that loads a saved one
    "loss_weight",  # (batch) -> how many predictions the model's mean loss averages over
    "predictions",  # (logits) -> per-row predictions to score, or None
    "probabilities",  # (logits) -> per-row class probabilities (for mAP), or None
    "metrics",  # (loss, labels, predictions, num_labels, probabilities) -> metrics
    "confusion",  # (labels, predictions, num_labels) -> counts[true][predicted], or None
    "score",  # (model, batch) -> per-row loss sums, counts, predictions, labels (lifelong evaluate)
    "encoder",  # (model_dir, max_length) -> callable: texts or encoded images -> inference.Batch
    "export_inputs",  # (model_dir, max_length, padded) -> example inputs to trace/export, their dynamic axes
    "parity_samples",  # (validation rows or None) -> texts or images to compare an export with PyTorch on
    "parity_groups",  # (samples) -> the batches (shapes) the comparison runs
    "comparable",  # (batch, logits a, logits b) -> the parts of a and b that must agree (export parity)
    "backend",  # (serve.backend) -> the backend it is served with
    "serving_model",  # (model_dir, backend, max_length, threads, device) -> what a replica calls
    "holdout_counts",  # (model, model_dir, holdout table, max_length[, generate=(rows, max_new_tokens)]) -> what gates.window_value reads
    "model_labels",  # (model) -> its label set (gates compare past windows over the classes both models know)
    "reference_metrics",  # (model, tokenizer, prompts, references, max_new_tokens) -> BLEU, chrF, exact match (generative; else None)
    "smoke_test",  # (serving model) -> None, or what is wrong with it
)
assert set(TASKS) == set(get_args(TaskName)), "TaskName and TASKS must name the same families"


def task(name: str) -> ModuleType:
    """The family module of a task name (configs and cards are validated against TaskName)."""
    try:
        return TASKS[name]
    except KeyError:
        raise LifelongError(f"unknown model.task '{name}': use one of {', '.join(TASKS)}") from None


def task_of_architectures(architectures: list[str]) -> str:
    """The task of a bare HF directory (no card), from its config's architecture names."""
    return next((name for name, module in TASKS.items() if module.claims(architectures)), DEFAULT)


def holdout_metric(config) -> str:
    """What a config's continual cycles measure on each holdout and gate on: continual.gates.metric,
    else its task's HOLDOUT_METRIC."""
    return config.continual.gates.metric or task(config.model.task).HOLDOUT_METRIC


def with_capability(flag: str) -> list[str]:
    """The task names whose module sets `flag`, for messages that say what would work."""
    return [name for name, module in TASKS.items() if getattr(module, flag)]
