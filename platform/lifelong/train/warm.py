"""One-worker runs of continual cycles in a warm actor, not a fresh Ray Train run each.

    cycle (driver) ──train(loop_config, datasets)──▶ WarmTrainer actor (the worker's CPUs/GPU)
                                                       run_loop (the same DeepSpeed loop)
                                                       checkpoints → <root>/runs/<run>/checkpoint_<epoch>/

A Ray Train run starts a controller, a worker group and data-split coordinators, each a process
importing torch: on 2 cores that is most of a small window's cycle. A cycle of one worker trains
in a `WarmTrainer` instead: one actor, started once per driver and kept for its later cycles (a
daemon's), with torch, DeepSpeed and the tokenizer loaded. Its checkpoints are stored like a Ray
Train run's: files first, then `lifelong-checkpoint.json` (the epoch's metrics) last, so a cycle
that stops anywhere resumes the same run from its last complete checkpoint; `num_to_keep` keeps
the best by the score attribute, and the latest (where a resume starts). An actor that dies (killed, out of memory) is
replaced and the run resumed, up to `train.max_failures` times, as Ray Train would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
import ray.train

from lifelong.console import say
from lifelong.errors import first_line
from lifelong.storage import Storage
from lifelong.train.loop import OneProcessSession, run_loop

MARKER = "lifelong-checkpoint.json"


@dataclass
class RunResult:
    """What `register_best` reads of a run: its checkpoints with their metrics, best first kept."""

    path: str
    metrics: dict | None
    checkpoint: ray.train.Checkpoint | None
    best_checkpoints: list[tuple[ray.train.Checkpoint, dict]] = field(default_factory=list)
    error: Exception | None = None


class StoredRun:
    """A run's checkpoints under <root>/runs/<run>/, as this module writes them."""

    def __init__(self, storage: Storage, run: str, num_to_keep: int | None, score: str, order: str):
        self.storage, self.rel = storage, f"runs/{run}"
        self.num_to_keep, self.score, self.order = num_to_keep, score, order

    def complete(self) -> list[tuple[str, dict]]:
        """(checkpoint rel, metrics) of every complete checkpoint, oldest first."""
        found = []
        for name in self.storage.listdir(self.rel):
            rel = f"{self.rel}/{name}"
            if name.startswith("checkpoint_") and self.storage.exists(f"{rel}/{MARKER}"):
                found.append((rel, self.storage.read_json(f"{rel}/{MARKER}")))
        return sorted(found, key=lambda cm: cm[1]["epoch"])

    def checkpoint(self, rel: str) -> ray.train.Checkpoint:
        return ray.train.Checkpoint(path=self.storage.path(rel), filesystem=self.storage.fs)

    def latest(self) -> ray.train.Checkpoint | None:
        done = self.complete()
        return self.checkpoint(done[-1][0]) if done else None

    def save(self, metrics: dict, directory: str) -> None:
        rel = f"{self.rel}/checkpoint_{metrics['epoch']:06d}"
        if self.storage.exists(rel):  # the remains of a save that was cut short
            self.storage.fs.delete_dir(self.storage.path(rel))
        self.storage.upload_dir(directory, rel)
        self.storage.write_json(f"{rel}/{MARKER}", metrics)  # last: from now on it is complete
        self._prune()

    def _prune(self) -> None:
        done = self.complete()
        if not self.num_to_keep or len(done) <= self.num_to_keep:
            return
        ranked = sorted(done, key=lambda cm: cm[1].get(self.score, float("inf")), reverse=self.order == "max")
        keep = {rel for rel, _ in ranked[: self.num_to_keep]} | {done[-1][0]}  # the latest too: a resume starts there
        for rel, _ in done:
            if rel not in keep:
                self.storage.delete(f"{rel}/{MARKER}")  # first: a half-deleted checkpoint is never taken for whole
                self.storage.fs.delete_dir(self.storage.path(rel))

    def result(self) -> RunResult:
        done = self.complete()
        checkpoints = [(self.checkpoint(rel), metrics) for rel, metrics in done]
        latest = checkpoints[-1] if checkpoints else (None, None)
        return RunResult(self.storage.path(self.rel), latest[1], latest[0], checkpoints)


class StoredRunSession(OneProcessSession):
    """The loop in a warm actor: checkpoints to and from a `StoredRun`."""

    def __init__(self, datasets: dict, gpu: bool, run: StoredRun):
        super().__init__(datasets, gpu)
        self.run = run

    def checkpoint(self):
        return self.run.latest()

    def report(self, metrics: dict, directory: str) -> None:
        self.run.save(metrics, directory)


@ray.remote(max_restarts=0, max_concurrency=1)
class WarmTrainer:
    """Runs one-worker training runs one after the other in this process."""

    def train(self, loop_config: dict, datasets: dict, gpu: bool, run: StoredRun) -> None:
        run_loop(loop_config, StoredRunSession(datasets, gpu, run))


_trainers: dict[tuple, ray.actor.ActorHandle] = {}


def _key(resources: dict) -> tuple:
    return (ray.get_runtime_context().get_job_id(), *sorted(resources.items()))  # a new connection starts afresh


def warm_trainer(resources: dict) -> ray.actor.ActorHandle:
    """This driver's warm actor for `resources`, started now if there is none: a driver calls it
    early, so that the actor's imports (torch, transformers, DeepSpeed) overlap its data work."""
    key = _key(resources)
    if key not in _trainers:
        _trainers[key] = WarmTrainer.options(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0)).remote()
    return _trainers[key]


def train_warm(loop_config: dict, datasets: dict, gpu: bool, run: StoredRun, resources: dict, max_failures: int) -> RunResult:
    """Train in this driver's warm actor for `resources` (started on first use); a dead actor is
    replaced and the run resumed from its last checkpoint, `max_failures` times at most."""
    key = _key(resources)
    failures = 0
    while True:
        trainer = warm_trainer(resources)
        try:
            ray.get(trainer.train.remote(loop_config, datasets, gpu, run))
            return run.result()
        except ray.exceptions.RayActorError as e:
            _trainers.pop(key, None)
            failures += 1
            if max_failures >= 0 and failures > max_failures:
                return RunResult(run.storage.path(run.rel), None, None, error=e)
            say(f"[lifelong] the training actor died ({first_line(e)}): resuming the run (failure {failures} of {max_failures})")
