"""Judging a model on data without training it (`lifelong evaluate`).

Scoring runs in Ray Data actors (`map_batches`), so a large evaluation set is streamed
through the cluster; only per-row losses and predictions come back to the driver. Data of at
most data.in_process_mb is read, tokenized and scored in the command's own process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
import torch
from ray.data.block import BlockAccessor

from lifelong.config import JobConfig
from lifelong.data import RESPONSE, DataReport, TokenizerRef, dataset_of, read_validated, tokenized
from lifelong.errors import DataError
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.tasks import task


class Scorer:
    """A Ray Data actor: loads the model once, returns per-row loss sums and predictions."""

    def __init__(self, storage_root: str, ref: str, task_name: str):
        from lifelong.models import load_for_inference

        resolved = Registry(Storage(storage_root)).resolve(ref)
        self.task = task(task_name)
        self.model = load_for_inference(resolved.local_dir, task_name)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with warnings.catch_warnings():  # batches read straight from the object store are read-only; nothing writes them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return self.task.score(self.model, batch)


@dataclass
class Evaluation:
    model: str
    task: str
    metrics: dict[str, float]
    data: DataReport
    labels: list[str] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # counts[true][predicted], for classifiers

    def to_dict(self, per_file: bool = True) -> dict:
        out = {"model": self.model, "task": self.task, "metrics": self.metrics, "data": self.data.to_dict(per_file)}
        if self.confusion is not None:
            out["confusion_matrix"] = {"labels": self.labels, "counts": self.confusion}
        return out


def evaluate_model(
    config: JobConfig,
    ref: str,
    data_path: str | None = None,
    workers: int = 1,
    batch_size: int = 32,
    generate_rows: int = 200,
    max_new_tokens: int | None = None,
) -> Evaluation:
    """Metrics of model `ref` on every valid row of `data_path` (default: config.data.path). On
    instruction rows (data.response_column) a generative model also answers the first
    `generate_rows` prompts (at most `max_new_tokens` each; default serve.max_new_tokens), scored
    against their responses (BLEU, chrF, exact match)."""
    storage = Storage(config.storage.root)
    resolved = Registry(storage).resolve(ref)
    task_name = resolved.task
    validated = read_validated(config.require_data("evaluate"), storage, quarantine_area="evaluate", path=data_path)
    tokenizer = TokenizerRef(version=resolved.ref, root=config.storage.root)
    every_row = validated.split_rows(None)
    rows = tokenized(every_row, task_name, tokenizer, config.model.max_length, config.data.pack)
    scorer = {"storage_root": storage.root_uri, "ref": ref, "task_name": task_name}
    if validated.table is not None:  # read here (data.in_process_mb): scored here too, no actor to start
        score = Scorer(**scorer)
        blocks = [BlockAccessor.batch_to_block(score(b)) for b in rows.iter_batches(batch_size=batch_size, batch_format="numpy")]
        scored = dataset_of(blocks) if blocks else None
    else:
        scored = rows.map_batches(Scorer, fn_constructor_kwargs=scorer, batch_size=batch_size, batch_format="numpy", concurrency=workers)
    parts = [b for b in scored.iter_batches(batch_size=4096, batch_format="pandas")] if scored is not None else []
    if not parts:
        # Rows existed, but causal-LM packing made no full block of max_length tokens.
        raise DataError(f"no complete blocks of {config.model.max_length} tokens to evaluate: use more text or a smaller model.max_length")
    scores = pd.concat(parts)
    loss = float(scores["loss_sum"].sum() / max(scores["count"].sum(), 1))
    labels = config.data.labels or (resolved.card.labels if resolved.card else None) or []
    family = task(task_name)
    probs = np.stack(scores["prob"].to_numpy()) if "prob" in scores else None
    metrics = family.metrics(loss, scores["label"].tolist(), scores["pred"].tolist(), len(labels), probs)
    metrics["rows"] = float(len(scores))
    if family.reference_metrics is not None:
        sample = _instructions(every_row, generate_rows)
        if sample is not None:
            prompts, references = sample.column("text").to_pylist(), sample.column(RESPONSE).to_pylist()
            from lifelong.models import load_for_inference

            model, tokenizer = load_for_inference(resolved.local_dir, task_name), family.load_preprocessor(resolved.local_dir)
            metrics.update(family.reference_metrics(model, tokenizer, prompts, references, max_new_tokens or config.serve.max_new_tokens))
    counts = family.confusion(scores["label"].tolist(), scores["pred"].tolist(), len(labels)) if "pred" in scores else None
    return Evaluation(model=resolved.ref, task=task_name, metrics=metrics, data=validated.report, labels=labels, confusion=counts)


def _instructions(rows: ray.data.Dataset | pa.Table, n: int) -> pa.Table | None:
    """The first `n` instruction rows (prompt in `text`, and `response`), or None for plain text."""
    if isinstance(rows, pa.Table):
        return rows.slice(0, n) if RESPONSE in rows.column_names else None
    return pa.Table.from_pylist(rows.take(n)) if RESPONSE in rows.schema().names else None
