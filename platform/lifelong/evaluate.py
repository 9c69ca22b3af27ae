"""Task metrics, and judging a model on data without training it (`lifelong evaluate`).

Scoring runs in Ray Data actors (`map_batches`), so a large evaluation set is streamed
through the cluster; only per-row losses and predictions come back to the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lifelong.config import JobConfig
from lifelong.data import DataReport, TokenizerRef, read_validated, tokenized
from lifelong.errors import DataError
from lifelong.registry import Registry
from lifelong.storage import Storage


def lm_metrics(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def classification_metrics(labels: list[int], preds: list[int], loss: float, num_labels: int) -> dict[str, float]:
    # Imported here: scikit-learn pulls in SciPy (~1 s of CPU), which every training worker and
    # driver importing this module paid, language-model runs included.
    from sklearn.metrics import accuracy_score, f1_score

    if not labels:
        return {"loss": loss, "accuracy": float("nan"), "macro_f1": float("nan")}
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)),
    }


class Scorer:
    """A Ray Data actor: loads the model once, returns per-row loss sums and predictions."""

    def __init__(self, storage_root: str, ref: str, task: str):
        from lifelong.models import load_for_inference

        resolved = Registry(Storage(storage_root)).resolve(ref)
        self.task = task
        self.model = load_for_inference(resolved.local_dir, task)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"])
        labels = torch.as_tensor(batch["labels"])
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        if self.task == "causal-lm":
            # Token t predicts token t+1; padding (mask 0) does not count.
            target_mask = mask[:, 1:].float()
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            return {
                "loss_sum": (ce * target_mask).sum(1).numpy(),
                "count": target_mask.sum(1).numpy(),
                "pred": np.full(len(ids), -1),
                "label": np.full(len(ids), -1),
            }
        ce = F.cross_entropy(logits, labels, reduction="none")
        return {"loss_sum": ce.numpy(), "count": np.ones(len(ids)), "pred": logits.argmax(-1).numpy(), "label": labels.numpy()}


@dataclass
class Evaluation:
    model: str
    task: str
    metrics: dict[str, float]
    data: DataReport

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "metrics": self.metrics, "data": self.data.to_dict()}


def evaluate_model(config: JobConfig, ref: str, data_path: str | None = None, workers: int = 1, batch_size: int = 32) -> Evaluation:
    """Metrics of model `ref` on every valid row of `data_path` (default: config.data.path)."""
    storage = Storage(config.storage.root)
    resolved = Registry(storage).resolve(ref)
    task = resolved.task
    validated = read_validated(config.require_data("evaluate"), storage, quarantine_area="evaluate", path=data_path)
    rows = tokenized(validated.split(None), task, TokenizerRef(version=resolved.ref, root=config.storage.root), config.model.max_length)
    scored = rows.map_batches(
        Scorer,
        fn_constructor_kwargs={"storage_root": storage.root_uri, "ref": ref, "task": task},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
    )
    parts = [b for b in scored.iter_batches(batch_size=4096, batch_format="pandas")]
    if not parts:
        # Rows existed, but causal-LM packing made no full block of max_length tokens.
        raise DataError(f"no complete blocks of {config.model.max_length} tokens to evaluate: use more text or a smaller model.max_length")
    scores = pd.concat(parts)
    loss = float(scores["loss_sum"].sum() / max(scores["count"].sum(), 1))
    if task == "causal-lm":
        metrics = lm_metrics(loss)
    else:
        labels = config.data.labels or (resolved.card.labels if resolved.card else None) or []
        metrics = classification_metrics(scores["label"].tolist(), scores["pred"].tolist(), loss, len(labels))
    metrics["rows"] = float(len(scores))
    return Evaluation(model=resolved.ref, task=task, metrics=metrics, data=validated.report)
