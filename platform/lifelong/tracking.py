"""Experiment tracking: what a run, a sweep and a cycle did, in TensorBoard's event files.

`tracking.tensorboard.dir` in any config (a local directory; the `tensorboard` package, the
`tracking` extra): rank 0 of every training run writes `<dir>/<run name>/` (its config as text,
the loss and learning rate at every logged step, each epoch's metrics, and the version it
became), so a sweep's trials are `<dir>/<sweep>-<trial id>/` side by side. A sweep writes its
outcome to `<dir>/<sweep>/`, a stream each cycle's decision and CL metrics to `<dir>/<stream>/`
(step: the window). Off (no section), nothing is imported or written.

`tracking.mlflow.uri` (an `mlflow server`, the `tracking` extra's mlflow-skinny client): one
MLflow run per training run (params: the config, flattened; metrics: the same as TensorBoard's,
at the same steps; tags: the version it became and its place in the registry). A sweep is a
parent run with a child run per trial, a stream's cycle a parent run (its decision, reason and
CL metrics) over the training run(s) of its window. A run is found again by its tags
(`lifelong.run`, `lifelong.root`), so a resumed run, trial or cycle logs into the run it began.
The driver makes the runs before any work (`begin`: an unreachable server stops the command
there, with one message); once training has begun, a lost server costs the run its tracking
(one warning), never its training.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

from lifelong.config import JobConfig
from lifelong.console import say
from lifelong.errors import LifelongError

RUN_TAG, ROOT_TAG, PARENT_TAG = "lifelong.run", "lifelong.root", "mlflow.parentRunId"


class RunTracker:
    """Rank 0's writer for one training run; every method is a no-op when tracking is off."""

    def __init__(self, config: JobConfig, rank: int):
        self.writer, self.mlflow = None, None
        if rank != 0:
            return
        run_name = config.run_name or config.name
        if config.tracking.tensorboard is not None:
            self.writer = _writer(config, run_name)
            self.writer.add_text("config", _fenced(config.model_dump(mode="json", exclude_defaults=True)), 0)
        if config.tracking.mlflow is not None:
            self.mlflow = MlflowRun.of(config, run_name)
            self.mlflow.params(_flat(config.model_dump(mode="json")))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/step_loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
        if self.mlflow is not None:
            self.mlflow.metrics({"train/step_loss": loss, "train/lr": lr}, global_step)

    def epoch(self, global_step: int, metrics: dict) -> None:
        shown = {_tag(k): v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("epoch", "global_step", "progress")}
        if self.writer is not None:
            for key, value in shown.items():
                self.writer.add_scalar(key, value, global_step)
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.metrics(shown, global_step)
            # Sent before the epoch's checkpoint is reported: a trial the scheduler stops after
            # that report is killed, and its best epoch must be in MLflow.
            self.mlflow.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end("FINISHED")


def begin(config: JobConfig, run_name: str, parent: str | None = None) -> None:
    """Before a run, trial or cycle trains (on the driver): its MLflow run, found again or made,
    under `parent`'s run when given (a sweep's, a cycle's). An unreachable server or a refused
    request ends the command here, before any work, with one message."""
    if config.tracking.mlflow is None:
        return
    client = _client(config)
    try:
        parent_id = _run(client, config, parent).info.run_id if parent else None
        _run(client, config, run_name, parent_id)
    except Exception as e:
        raise LifelongError(f"cannot log to MLflow at {config.tracking.mlflow.uri} (tracking.mlflow.uri): {_first_line(e)}") from e


def registered(config: JobConfig, run_name: str, ref: str, where: str) -> None:
    """The version a run became (from the driver, into the run's own directory and MLflow run)."""
    if config.tracking.tensorboard is not None:
        with _writer(config, run_name) as writer:
            writer.add_text("registry", f"registered as **{ref}** ({where})", 0)
    if config.tracking.mlflow is not None:
        run = MlflowRun.of(config, run_name)
        run.tags({"lifelong.version": ref, "lifelong.registry": where})
        run.end("FINISHED")


def sweep(config: JobConfig, name: str, table, trials: dict, best: dict | None, ref: str | None) -> None:
    """A sweep's trial table, its best and its trials by state (`trials`, the counts its webhook sends)."""
    if config.tracking.tensorboard is not None:
        with _writer(config, name) as writer:
            writer.add_text("trials", f"```\n{table.to_csv(index=False)}```" if len(table) else "no trial ran", 0)
            writer.add_text("best", f"{ref}: {json.dumps(best, default=str)}" if best else "no trial finished", 0)
            for state, count in trials.items():
                writer.add_scalar(f"trials/{state}", count, 0)
    if config.tracking.mlflow is not None:
        run = MlflowRun.of(config, name)
        run.params({f"space.{k}": json.dumps(v, default=str) for k, v in config.tune.space.items()})
        run.metrics({f"trials/{state}": count for state, count in trials.items()}, 0)
        if best:
            run.metrics({f"best/{k}": v for k, v in best.items() if isinstance(v, (int, float))}, 0)
            run.tags({"lifelong.best_run": str(best.get("run")), "lifelong.version": ref or ""})
        run.text(table.to_csv(index=False), "trials.csv")
        run.end_children("KILLED")  # trials cut short (stopped early, errored) end with the sweep
        run.end("FINISHED")


def cycle(config: JobConfig, outcome) -> None:
    """A cycle that trained: its decision (text) and the stream's CL metrics at step = window."""
    if outcome.window is None:
        return
    step = outcome.window
    decision = f"window {step}: version {outcome.version} {outcome.status}: {outcome.reason}"
    cl = {f"cl/{k}": v for k, v in (outcome.metrics or {}).items() if isinstance(v, (int, float))}
    candidate = (outcome.accuracy or {}).get("candidate") or []
    per_window = {f"{outcome.metric}/window_{j}": v for j, v in enumerate(candidate) if v is not None}
    cycle_metrics = {"cycle/promoted": 1.0 if outcome.status == "promoted" else 0.0, "cycle/seconds": outcome.seconds}
    if config.tracking.tensorboard is not None:
        with _writer(config, outcome.stream) as writer:
            writer.add_text("decision", decision, step)
            for key, value in {**cycle_metrics, **cl, **per_window}.items():
                writer.add_scalar(key, value, step)
    if config.tracking.mlflow is not None:
        run = MlflowRun.of(config, cycle_run(outcome.stream, step))
        run.params({"window": step, "version": outcome.version, "champion_before": outcome.champion_before})
        run.metrics({**cycle_metrics, **cl, **per_window}, step)
        run.tags({"lifelong.decision": outcome.status, "lifelong.reason": outcome.reason, "mlflow.note.content": decision})
        run.end("FINISHED")


def cycle_run(stream: str, window: int) -> str:
    """The MLflow run of a stream's window k: the parent of the run(s) that trained it."""
    return f"{stream}-cycle-{window:03d}"


class MlflowRun:
    """One MLflow run, written through MLflow's client (no global active run: a warm actor trains
    many runs). Metrics go out from a thread of their own, batched (a request per logged step
    held rank 0 about 12 ms each: benchmarks/tracking_overhead.py); `flush` and `end` wait for
    them. After the first failed request it logs nothing more and says so once."""

    BATCH = 900  # metrics per request (MLflow takes up to 1000)

    def __init__(self, client, run_id: str | None, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self._queue: queue.SimpleQueue | None = None
        self._sender: threading.Thread | None = None

    @classmethod
    def of(cls, config: JobConfig, run_name: str) -> MlflowRun:
        client = _client(config)
        try:
            return cls(client, _run(client, config, run_name).info.run_id, config.tracking.mlflow.uri)
        except Exception as e:
            return cls(client, None, config.tracking.mlflow.uri)._lost(e)

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        run = self._call(self.client.get_run, self.run_id)
        if run is None or run.data.params:
            return  # logged when the run began (a resumed run keeps them)
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes 100 params per request
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if not items or self.run_id is None:
            return
        if self._sender is None:
            self._queue = queue.SimpleQueue()
            self._sender = threading.Thread(target=self._send, name="lifelong-mlflow", daemon=True)
            self._sender.start()
        self._queue.put(items)

    def flush(self) -> None:
        """Wait until the metrics logged so far have been sent (or given up on)."""
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join()
            self._sender = None

    def _send(self) -> None:
        while True:
            batch, last = self._queue.get(), False
            if batch is None:
                return
            while len(batch) < self.BATCH:  # what queued up meanwhile, in one request
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                batch.extend(more)
            self._call(self.client.log_batch, self.run_id, metrics=batch)
            if last:
                return

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def text(self, text: str, path: str) -> None:
        self._call(self.client.log_text, self.run_id, text, path)

    def end(self, status: str) -> None:
        self.flush()
        self._call(self.client.set_terminated, self.run_id, status)

    def end_children(self, status: str) -> None:
        """Its child runs still RUNNING (a trial the scheduler stopped was killed mid-epoch)."""
        if self.run_id is None:
            return
        run = self._call(self.client.get_run, self.run_id)
        children = self._call(
            self.client.search_runs,
            [run.info.experiment_id] if run else [],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' and attributes.status = 'RUNNING'",
        )
        for child in children or []:
            self._call(self.client.set_terminated, child.info.run_id, status)

    def _call(self, method, *args, **kwargs):
        if self.run_id is None:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as e:
            self._lost(e)
            return None

    def _lost(self, error: Exception) -> MlflowRun:
        say(f"[lifelong] warning: MLflow at {self.uri} failed ({_first_line(error)}); this run is no longer tracked there")
        self.run_id = None
        return self


def _client(config: JobConfig):
    # A lost server costs seconds, not MLflow's default of 7 retries with growing back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking.mlflow.uri)


def _run(client, config: JobConfig, name: str, parent_id: str | None = None):
    """The MLflow run tagged as this run of this store (found again), else a new one."""
    experiment = _experiment(client, config.tracking.mlflow.experiment or config.name)
    root = config.storage.root
    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`{RUN_TAG}` = '{_quoted(name)}' and tags.`{ROOT_TAG}` = '{_quoted(root)}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        if parent_id and found[0].data.tags.get(PARENT_TAG) != parent_id:
            client.set_tag(found[0].info.run_id, PARENT_TAG, parent_id)
        return found[0]
    tags = {RUN_TAG: name, ROOT_TAG: root, **({PARENT_TAG: parent_id} if parent_id else {})}
    return client.create_run(experiment, run_name=name, tags=tags)


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # made by another process meanwhile (a sweep's trials start together)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _flat(data: dict, prefix: str = "") -> dict:
    """A nested config as MLflow params: train.lr, model.config.n_layer, …"""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def _quoted(value: str) -> str:
    return value.replace("'", "\\'")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _writer(config: JobConfig, name: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(config.tracking.tensorboard.dir) / name))


def _tag(key: str) -> str:
    """val_accuracy → val/accuracy, train_loss → train/loss: TensorBoard groups by the prefix."""
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if head in ("train", "val") and rest else f"run/{key}"


def _fenced(data: dict) -> str:
    return "```\n" + json.dumps(data, indent=2, default=str) + "\n```"
