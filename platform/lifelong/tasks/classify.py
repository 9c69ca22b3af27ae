"""What the classification families (text and image) share: predictions, their metrics
(accuracy, macro-F1, mAP over the predicted probabilities) and the confusion matrix."""

from __future__ import annotations

import numpy as np


def loss_weight(batch) -> int:
    return int(batch["labels"].shape[0])


def predictions(logits) -> list[int]:
    return logits.float().argmax(-1).tolist()


def probabilities(logits) -> list[list[float]]:
    return logits.float().softmax(-1).tolist()


def metrics(loss: float, labels: list[int], preds: list[int], num_labels: int, probs=None) -> dict[str, float]:
    """Accuracy, macro-F1 over every label, and with `probs` (rows of class probabilities) mAP:
    the mean over the classes present of the average precision of their probability."""
    # Imported here: scikit-learn pulls in SciPy (~1 s of CPU), which every training worker and
    # driver importing this module paid, language-model runs included.
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score

    if not labels:
        return {"loss": loss, "accuracy": float("nan"), "macro_f1": float("nan"), **({"map": float("nan")} if probs is not None else {})}
    out = {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)),
    }
    if probs is not None:
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        present = [c for c in range(num_labels) if (y == c).any()]
        finite = bool(np.isfinite(p).all())  # a diverged model's NaN logits: the loss check names it, not sklearn
        out["map"] = float(np.mean([average_precision_score(y == c, p[:, c]) for c in present])) if finite else float("nan")
    return out


def confusion(labels: list[int], preds: list[int], num_labels: int) -> list[list[int]]:
    """counts[true][predicted]."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return counts.tolist()


def confusion_png(counts: list[list[int]], names: list[str], path, title: str = "") -> None:
    """The confusion matrix as a PNG (matplotlib, no display): true labels down, predictions across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n), dpi=100)
    ax.imshow(np.asarray(counts), cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scored(logits, labels) -> dict:
    """`score`'s per-row answer for a classifier: cross-entropy, prediction, label, probabilities."""
    import torch.nn.functional as F

    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    pred, prob = logits.argmax(-1).numpy(), logits.softmax(-1).numpy()
    return {"loss_sum": ce.numpy(), "count": np.ones(len(labels)), "pred": pred, "label": labels.numpy(), "prob": prob}


def comparable(batch, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return a, b


def backend(configured: str) -> str:
    return configured


def serving_model(model_dir, backend: str, max_length: int | None, threads: int, device: str):
    from lifelong.inference import Classifier

    return Classifier(model_dir, backend, max_length, threads=threads, device=device)


def probabilities_problem(model, items: list) -> str | None:
    """What is wrong with a classifier's answers to `items` (None: a distribution over its labels each)."""
    out = model.predict(items)
    probs = np.asarray([list(p["probabilities"].values()) for p in out])
    shaped = probs.shape == (len(items), len(model.labels))
    if not shaped or not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(1), 1, atol=1e-3):
        return f"probabilities {probs.tolist()}"
    return None


# --- a label set that grows (continual.new_labels: grow) ------------------------------------------
def saved_labels(model_dir) -> list[str] | None:
    """The label names of the classifier saved in `model_dir` (None: not a classifier)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if not any("Classification" in a for a in config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def grows(old: list[str] | None, labels: list[str]) -> bool:
    """`labels` keeps `old` (same names, same order) and adds to it."""
    return bool(old) and len(labels) > len(old) and labels[: len(old)] == old


def grown_head(model, labels: list[str]):
    """`model` (a classifier over a prefix of `labels`) with its head grown to all of them: the
    old classes' weights kept as they are, the new classes' rows initialised as the model's own
    fresh layers are (class-incremental learning)."""
    import torch
    from torch import nn

    old = model.config.num_labels
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == old]
    if not heads:
        raise ValueError(f"found no {old}-class output layer to grow in {type(model).__name__}")
    name, head = heads[-1]
    new = nn.Linear(head.in_features, len(labels), bias=head.bias is not None, dtype=head.weight.dtype)
    if hasattr(model, "_init_weights"):
        model._init_weights(new)
    with torch.no_grad():
        new.weight[:old] = head.weight
        if head.bias is not None:
            new.bias[old:] = 0.0
            new.bias[:old] = head.bias
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    model.config.num_labels = len(labels)  # (sets id2label/label2id to placeholders; named next)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {n: i for i, n in enumerate(labels)}
    if hasattr(model, "num_labels"):
        model.num_labels = len(labels)
    return model


def grown_from(auto_class, init_dir, labels: list[str]):
    """The classifier saved in `init_dir` with its head grown to `labels`, when `labels` keeps its
    label set and adds to it (None otherwise: the caller starts a new head)."""
    if not grows(saved_labels(init_dir), labels):
        return None
    return grown_head(auto_class.from_pretrained(str(init_dir), use_safetensors=True), labels)


HOLDOUT_METRIC = "accuracy"
GATE_METRICS = ("accuracy",)


def count_by_class(tokenize, score, content: str, model, model_dir, table, max_length: int, batch_size: int = 64) -> dict[str, list[int]]:
    """A classifier's answers on a holdout (content, label name), by its family's `tokenize` and
    `score`: {label: [correct, rows]}, every row counted (a class the model does not know is an
    error: it is never predicted)."""
    import pyarrow as pa
    import torch

    known = {model.config.id2label[i]: i for i in range(model.config.num_labels)}
    names = table.column("label").to_pylist()
    index = [known.get(name, -100) for name in names]
    rows = pa.table({content: table.column(content), "label": pa.array(index, pa.int64())})
    preds = []
    with torch.no_grad():
        for start in range(0, rows.num_rows, batch_size):
            batch = tokenize(rows.slice(start, batch_size), str(model_dir), max_length)
            preds += score(model, batch)["pred"].tolist()
    counts: dict[str, list[int]] = {}
    for name, truth, pred in zip(names, index, preds):
        c = counts.setdefault(name, [0, 0])
        c[0] += int(pred == truth)
        c[1] += 1
    return counts


def predicted_classes(
    tokenize, score, content: str, model, model_dir, table, max_length: int, batch_size: int = 64
) -> tuple[list[int], list[float]]:
    """A classifier's predicted class index for each row of `table` (its `content` column), and
    its probability (the model's confidence)."""
    import pyarrow as pa
    import torch

    rows = pa.table({content: table.column(content), "label": pa.array([-100] * table.num_rows, pa.int64())})
    preds: list[int] = []
    confidence: list[float] = []
    with torch.no_grad():
        for start in range(0, rows.num_rows, batch_size):
            out = score(model, tokenize(rows.slice(start, batch_size), str(model_dir), max_length))
            preds += out["pred"].tolist()
            confidence += out["prob"].max(-1).tolist()
    return preds, confidence


def model_labels(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]
