"""Experiment tracking: what a run, a sweep and a cycle did, in TensorBoard's event files.

`tracking.tensorboard.dir` in any config (a local directory; the `tensorboard` package, the
`tracking` extra): rank 0 of every training run writes `<dir>/<run name>/` (its config as text,
the loss and learning rate at every logged step, each epoch's metrics, and the version it
became), so a sweep's trials are `<dir>/<sweep>-<trial id>/` side by side. A sweep writes its
outcome to `<dir>/<sweep>/`, a stream each cycle's decision and CL metrics to `<dir>/<stream>/`
(step: the window). Off (no section), nothing is imported or written.
"""

from __future__ import annotations

import json
from pathlib import Path

from lifelong.config import JobConfig


class RunTracker:
    """Rank 0's writer for one training run; every method is a no-op when tracking is off."""

    def __init__(self, config: JobConfig, rank: int):
        self.writer = None
        if rank == 0 and config.tracking.tensorboard is not None:
            self.writer = _writer(config, config.run_name or config.name)
            self.writer.add_text("config", _fenced(config.model_dump(mode="json", exclude_defaults=True)), 0)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/step_loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, global_step: int, metrics: dict) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "global_step", "progress"):
                    self.writer.add_scalar(_tag(key), value, global_step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def registered(config: JobConfig, run_name: str, ref: str, where: str) -> None:
    """The version a run became (from the driver, into the run's own directory)."""
    if config.tracking.tensorboard is None:
        return
    with _writer(config, run_name) as writer:
        writer.add_text("registry", f"registered as **{ref}** ({where})", 0)


def sweep(config: JobConfig, name: str, table, trials: dict, best: dict | None, ref: str | None) -> None:
    """A sweep's trial table, its best and its trials by state (`trials`, the counts its webhook sends)."""
    if config.tracking.tensorboard is None:
        return
    with _writer(config, name) as writer:
        writer.add_text("trials", f"```\n{table.to_csv(index=False)}```" if len(table) else "no trial ran", 0)
        writer.add_text("best", f"{ref}: {json.dumps(best, default=str)}" if best else "no trial finished", 0)
        for state, count in trials.items():
            writer.add_scalar(f"trials/{state}", count, 0)


def cycle(config: JobConfig, outcome) -> None:
    """A cycle that trained: its decision (text) and the stream's CL metrics at step = window."""
    if config.tracking.tensorboard is None or outcome.window is None:
        return
    with _writer(config, outcome.stream) as writer:
        step = outcome.window
        writer.add_text("decision", f"window {step}: version {outcome.version} {outcome.status}: {outcome.reason}", step)
        writer.add_scalar("cycle/promoted", 1.0 if outcome.status == "promoted" else 0.0, step)
        writer.add_scalar("cycle/seconds", outcome.seconds, step)
        for key, value in (outcome.metrics or {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"cl/{key}", value, step)
        candidate = (outcome.accuracy or {}).get("candidate") or []
        for j, value in enumerate(candidate):
            if value is not None:
                writer.add_scalar(f"{outcome.metric}/window_{j}", value, step)


def _writer(config: JobConfig, name: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(config.tracking.tensorboard.dir) / name))


def _tag(key: str) -> str:
    """val_accuracy → val/accuracy, train_loss → train/loss: TensorBoard groups by the prefix."""
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if head in ("train", "val") and rest else f"run/{key}"


def _fenced(data: dict) -> str:
    return "```\n" + json.dumps(data, indent=2, default=str) + "\n```"
