"""`lifelong continual report`: the accuracy matrix (a language model's stream: the perplexity
matrix) and the CL metrics over cycles, as text, JSON, PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lifelong.config import JobConfig
from lifelong.continual.cycle import stream_name
from lifelong.continual.gates import REFERENCE_METRICS, accuracy_matrix
from lifelong.continual.ledger import Ledger
from lifelong.continual.metrics import metrics_over_cycles
from lifelong.continual.stream import Stream
from lifelong.errors import LifelongError
from lifelong.storage import Storage, local_cache_dir


@dataclass
class Report:
    data: dict
    text: str
    json_path: Path
    matrix_png: Path
    metrics_png: Path


def build(config: JobConfig) -> dict:
    storage = Storage(config.storage.root)
    name = stream_name(config)
    state = Stream(storage, name).state()
    windows = state["windows"]
    if not windows:
        raise LifelongError(f"stream '{name}' has no finished cycle yet under {storage.uri_of('streams', name)}")
    R = accuracy_matrix(windows)
    metric = state.get("metric", "accuracy")
    return {
        "stream": name,
        "model": config.name,
        "metric": metric,
        "windows": [
            {k: w[k] for k in ("window", "version", "status", "reason", "champion_before", "new_rows", "replay_rows")} for w in windows
        ],
        f"{metric}_matrix": R,
        "baseline": state.get("baseline", []),
        "metrics_over_cycles": metrics_over_cycles(R, state.get("baseline"), metric),
        "ledger": Ledger(storage, name).counts(),
        **({"live": live(config, storage, name)} if config.serve.log_predictions is not None else {}),
    }


def live(config: JobConfig, storage: Storage, stream: str) -> dict:
    """What users' feedback says: accuracy per version and role (the champion's answers, a shadow's),
    and how many labels came, landed and corrected (serve.log_predictions)."""
    from lifelong.feedback import Labels, landed_count, live_accuracy

    days = config.serve.log_predictions.retention_days
    labels = Labels.read(storage, config.served_model, days)
    return {
        "accuracy": {str(v): roles for v, roles in sorted(live_accuracy(storage, config.served_model, days, labels).items())},
        "labels": len(labels.latest),
        "corrections": labels.corrections,
        "landed": landed_count(storage, stream),
    }


def render(data: dict) -> str:
    metric = data.get("metric", "accuracy")
    R, T = data[f"{metric}_matrix"], len(data[f"{metric}_matrix"])
    average = {"accuracy": "ACC", "perplexity": "PPL"}.get(metric, metric.upper())
    relative = " (BWT, FWT and forgetting relative to the perplexities they compare)" if metric == "perplexity" else ""
    lines = [
        f"stream '{data['stream']}' ({data['model']}): {T} window(s); ledger {data['ledger']}",
        "",
        f"{metric} matrix R[i][j] (row: the champion after window i; column: window j's holdout)",
        "        " + "".join(f"  {'w' + str(j):>8}" for j in range(T)),
    ]
    for i, row in enumerate(R):
        lines.append(f"after w{i:<2}" + "".join(f"  {v:8.3f}" if v is not None else f"  {'-':>8}" for v in row))
    lines += ["", f"{'cycle':<6} {'version':>7} {'decision':<9} {average:>8} {'BWT':>7} {'FWT':>7} {'forget':>7}{relative}"]

    def f(v):
        return f"{v:7.3f}" if v is not None else "      -"

    for w, m in zip(data["windows"], data["metrics_over_cycles"]):
        lines.append(
            f"{w['window']:<6} {w['version']:>7} {w['status']:<9} {m[f'average_{metric}']:8.3f} {f(m['backward_transfer'])} "
            f"{f(m['forward_transfer'])} {f(m['forgetting'])}"
        )
    if "live" in data:
        live = data["live"]
        lines += [
            "",
            f"live, from feedback: {live['labels']} labelled item(s), {live['landed']} landed, {live['corrections']} correction(s)",
        ]
        for version, roles in live["accuracy"].items():
            for role, c in roles.items():
                lines.append(f"  version {version:>4} {role:<9} accuracy {c['accuracy']:.3f} on {c['labelled']} labelled answer(s)")
    return "\n".join(lines)


def write_report(config: JobConfig, out: Path | None = None) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = build(config)
    storage = Storage(config.storage.root)
    if out is None:
        out = (
            Path(storage.path("streams", data["stream"], "report"))
            if storage.is_local
            else local_cache_dir("streams", data["stream"], "report")
        )
    out.mkdir(parents=True, exist_ok=True)
    json_path, matrix_png, metrics_png = out / "report.json", out / "matrix.png", out / "metrics.png"
    json_path.write_text(json.dumps(data, indent=2) + "\n")

    metric = data["metric"]
    R = [[v if v is not None else float("nan") for v in row] for row in data[f"{metric}_matrix"]]
    values = [v for row in R for v in row if v == v]
    # Accuracy (exact match) on its 0..1 scale, BLEU and chrF on 0..100; perplexity on the stream's
    # own range, darker where it is higher (worse).
    scale = {"accuracy": 1.0, **REFERENCE_METRICS}.get(metric)
    lo, hi, cmap = (0.0, scale, "viridis") if scale else (min(values), max(values), "viridis_r")
    fig, ax = plt.subplots(figsize=(1.2 * len(R) + 2, 1.0 * len(R) + 1.5))
    im = ax.imshow(R, vmin=lo, vmax=hi, cmap=cmap)
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            if v == v:
                dark = (v - lo) / ((hi - lo) or 1) < 0.6 if scale else (v - lo) / ((hi - lo) or 1) > 0.4
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if dark else "black", fontsize=8)
    ax.set_xticks(range(len(R)), [f"w{j}" for j in range(len(R))])
    ax.set_yticks(range(len(R)), [f"after w{i}" for i in range(len(R))])
    ax.set_xlabel("holdout of window j")
    ax.set_ylabel("champion after window i")
    ax.set_title(f"stream {data['stream']}: {metric} matrix")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(matrix_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    cycles = list(range(len(data["metrics_over_cycles"])))
    # A perplexity (BLEU, chrF) on its own axis: the relative measures are fractions (points).
    average_ax = ax if metric in ("accuracy", "exact_match") else ax.twinx()
    for key in (f"average_{metric}", "backward_transfer", "forward_transfer", "forgetting"):
        values = [m[key] if m[key] is not None else float("nan") for m in data["metrics_over_cycles"]]
        on_own_axis = key.startswith("average") and average_ax is not ax
        (average_ax if on_own_axis else ax).plot(cycles, values, marker="o", label=key, color="black" if on_own_axis else None)
    if average_ax is not ax:
        average_ax.set_ylabel(f"average {metric} (black)")
    ax.set_xticks(cycles)
    ax.set_xlabel("cycle (window)")
    ax.set_title(f"stream {data['stream']}: continual-learning metrics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(metrics_png, dpi=110)
    plt.close(fig)
    return Report(data, render(data), json_path, matrix_png, metrics_png)
