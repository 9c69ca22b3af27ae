"""The driver of a training run: data → tokenizer → TorchTrainer (DeepSpeed workers) → registry.

read + validate (Ray Data) ─▶ tokenizer (given, from init_from, or trained on the corpus)
    ─▶ TorchTrainer(datasets=train/validation) ─▶ best checkpoint ─▶ registry version
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from lifelong import tracking
from lifelong.config import JobConfig
from lifelong.console import say, training_bar
from lifelong.data import RESPONSE, DataReport, TokenizerRef, ValidatedData, dataset_of, first_rows, read_validated, tokenized
from lifelong.errors import ConfigError, DataError, LifelongError, first_line
from lifelong.export import ExportResult, OnnxTemplate, export_files, export_formats, should_export_on_register
from lifelong.models import merge_adapter
from lifelong.moe import is_moe_dir
from lifelong.registry import Registry, ResolvedModel
from lifelong.runtime import release_orphaned_workers
from lifelong.storage import Storage, is_uri
from lifelong.tasks import task
from lifelong.train.ds_config import total_optimizer_steps
from lifelong.train.loop import train_loop_per_worker
from lifelong.train.warm import StoredRun, train_warm, warm_trainer


@dataclass
class TrainingOutcome:
    run_name: str
    run_path: str
    version: int | None
    model: str
    metrics: dict
    data: DataReport
    epochs_run: list[int] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"


def use_gpu(config: JobConfig) -> bool:
    if config.scaling.use_gpu != "auto":
        return bool(config.scaling.use_gpu)
    needed = config.scaling.num_workers * config.scaling.gpus_per_worker
    return ray.cluster_resources().get("GPU", 0) >= needed


def prepare_tokenizer(config: JobConfig, storage: Storage, registry: Registry, train_rows) -> TokenizerRef:
    """The run's tokenizer (an image processor, for image tasks): model.tokenizer, else
    init_from's (a pinned NAME:VERSION), else a new one (the task's: a BPE trained on the corpus,
    an image processor at the model's image size) stored with the run, so that a resumed run
    reuses exactly the same one. A reference that every node resolves for itself, never a path
    that exists only here."""
    family = task(config.model.task)
    if config.model.tokenizer:
        given = config.model.tokenizer
        if not is_uri(given):
            path = Path(given).expanduser()
            if not any((path / name).is_file() for name in family.PREPROCESSOR_FILES):
                raise ConfigError(f"model.tokenizer='{given}' is not a directory with {' or '.join(family.PREPROCESSOR_FILES)}")
            given = str(path.resolve())
        return TokenizerRef(given)
    if config.model.init_from:
        return TokenizerRef(version=registry.resolve(config.model.init_from, weights=False).ref, root=storage.uri)
    rel = f"runs/{config.run_name or config.default_run_name}/tokenizer"
    if not any(storage.exists(f"{rel}/{name}") for name in family.PREPROCESSOR_FILES):
        with tempfile.TemporaryDirectory() as tmp:
            family.fresh_preprocessor(config, train_rows, tmp)
            storage.upload_dir(tmp, rel)
    return TokenizerRef(storage.location(rel))


@dataclass
class PreparedData:
    """A run's data: tokenized splits materialized in the object store (read and tokenized once;
    every epoch, every restarted worker group and every sweep trial iterates them without
    starting a task, so training workers never wait on CPUs for their data)."""

    report: DataReport
    tokenizer: TokenizerRef
    train_ds: ray.data.Dataset
    val_ds: ray.data.Dataset
    train_examples: int
    val_examples: int
    # Untokenized validation rows (text, label) for export's int8 gate, as read (a table when read
    # here); None in sweep trials.
    validation_rows: ray.data.Dataset | pa.Table | None = None
    # The validation prompts and responses the loop answers each epoch (train.eval_generate_rows).
    reference: dict | None = None

    def for_trials(self) -> PreparedData:
        """What every trial of a sweep needs: the tokenized splits, not the raw rows."""
        return dataclasses.replace(self, validation_rows=None)


def read_run_data(config: JobConfig, storage: Storage) -> ValidatedData:
    """data.path read, validated and checked to give both splits."""
    validated = read_validated(config.require_data("training"), storage, quarantine_area=f"training/{config.name}")
    report = validated.report
    for split in ("train", "validation"):
        if not report.rows.get(split):
            raise DataError(
                f"the {split} split of '{report.source}' is empty ({report.summary()}); add rows or change data.validation_fraction"
            )
    say(f"[lifelong] data: {report.summary()}")
    return validated


def prepare_data(config: JobConfig, storage: Storage, registry: Registry, validated: ValidatedData | None = None) -> PreparedData:
    """From files (data.path): settle the tokenizer, tokenize, materialize and count."""
    validated = validated or read_run_data(config, storage)
    train, validation = validated.split_rows("train"), validated.split_rows("validation")
    return _tokenized_data(config, storage, registry, train, validation, validated.report)


def prepare_data_from_tables(
    config: JobConfig, storage: Storage, registry: Registry, train: pa.Table, validation: pa.Table, report: DataReport
) -> PreparedData:
    """From rows already on the driver (a continual window: its new rows, a replay sample, its
    holdout): tokenized here up to data.in_process_mb, by Ray Data above it."""
    if train.nbytes + validation.nbytes <= config.data.in_process_mb * 2**20:
        return _tokenized_data(config, storage, registry, train, validation, report)
    return _tokenized_data(config, storage, registry, dataset_of([train]), dataset_of([validation]), report)


def _tokenized_data(
    config: JobConfig,
    storage: Storage,
    registry: Registry,
    train_rows: ray.data.Dataset | pa.Table,
    val_rows: ray.data.Dataset | pa.Table,
    report: DataReport,
) -> PreparedData:
    """Tokenized splits, materialized: by Ray Data for datasets, here in the driver for tables."""
    here = isinstance(train_rows, pa.Table)
    tokenizer = prepare_tokenizer(config, storage, registry, train_rows)
    max_length = config.model.max_length
    # Shuffled once, across files (rows arrive file by file, a continual window's new rows before
    # its replayed ones): the materialized order is every epoch's, and the loop's local shuffle
    # buffer alone would leave the last file's rows at the end of every epoch.
    if here:
        train_rows = train_rows.take(np.random.default_rng(config.train.seed).permutation(train_rows.num_rows))
    else:
        train_rows = train_rows.random_shuffle(seed=config.train.seed)
    pack = config.data.pack
    train_ds = tokenized(train_rows, config.model.task, tokenizer, max_length, pack).materialize()
    val_ds = tokenized(val_rows, config.model.task, tokenizer, max_length, pack).materialize()
    # Sizing the schedule needs the number of examples (packed blocks for causal LM).
    return PreparedData(
        report,
        tokenizer,
        train_ds,
        val_ds,
        train_ds.count(),
        val_ds.count(),
        validation_rows=val_rows,
        reference=reference_rows(config, val_rows),
    )


@dataclass
class PreparedRun:
    """Everything a TorchTrainer needs, read and checked once on the driver."""

    config: JobConfig
    storage: Storage
    registry: Registry
    parent: ResolvedModel | None
    data: PreparedData
    total_steps: int
    gpu: bool
    # A continual cycle's loss weights of its new and its replayed rows (continual.replay_weighting).
    row_weights: dict[str, float] | None = None
    # A continual cycle's replay samples, one per epoch (continual.replay_refresh: epoch), marked
    # 1, 2, … in the rows' replayed column: epoch e trains on the new rows and sample e's.
    replay_samples: int = 1


def prepare_run(config: JobConfig, data: PreparedData | None = None, epoch_examples: int | None = None) -> PreparedRun:
    """Check the run against its data (prepared here unless given) and size the schedule, for
    `epoch_examples` per epoch (a continual cycle's with a replay sample per epoch), else all."""
    storage = Storage(config.storage.root)
    registry = Registry(storage)
    parent = registry.resolve(config.model.init_from) if config.model.init_from else None
    if parent is not None:
        check_positions(parent, config.model.max_length)
        if parent.name is not None:  # pinned: the workers (and LoRA adapters' record) load this very version
            config = config.model_copy(update={"model": config.model.model_copy(update={"init_from": parent.ref})})
        if config.train.lora and is_moe_dir(parent.local_dir):
            raise ConfigError(
                f"train.lora on '{parent.ref}', a Mixture-of-Experts model, is not supported (DeepSpeed's MoE needs its experts "
                "among the trained parameters): fine-tune it without train.lora"
            )
        if config.train.lora and parent.name is None:
            raise ConfigError(
                f"train.lora needs model.init_from to be a registry version (NAME:VERSION or NAME@ALIAS), not the directory "
                f"'{config.model.init_from}': an adapters' version names the version it adapts"
            )
        known = parent.card.labels if config.train.lora and task(config.model.task).LABELLED else None
        if known is not None and known != config.data.labels:  # a base without a head (an LM, an encoder) gets one
            raise ConfigError(
                f"train.lora trains the head of '{parent.ref}' for its labels {known}; data.labels is "
                f"{config.data.labels}: set the same labels, in that order, or fine-tune without train.lora to change them"
            )
    data = data or prepare_data(config, storage, registry)
    workers = config.scaling.num_workers
    if data.train_examples < workers or data.val_examples < workers:
        raise DataError(
            f"too little data for {workers} workers: {data.train_examples} training and {data.val_examples} validation "
            f"examples of {config.model.max_length} tokens; add data, lower model.max_length or scaling.num_workers"
        )
    total_steps = total_optimizer_steps(config.train, math.floor((epoch_examples or data.train_examples) / workers))
    gpu = use_gpu(config)
    if not gpu and config.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs CUDA GPUs and this cluster has none: use bf16 or fp32")
    return PreparedRun(config, storage, registry, parent, data, total_steps, gpu)


def check_positions(parent: ResolvedModel, max_length: int) -> None:
    """A text model has as many positions as it was built with: longer sequences would fail deep
    in its embedding, on a worker."""
    config_json = Path(parent.local_dir) / "config.json"
    if not config_json.is_file():
        return
    config = json.loads(config_json.read_text())
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    if positions and max_length > positions:
        raise ConfigError(
            f"model.max_length is {max_length} but model.init_from '{parent.ref}' has {positions} positions: "
            f"set model.max_length to {positions} or less"
        )


def loop_config(prep: PreparedRun, report_every_steps: int | None = None) -> dict:
    """What the training loop gets, wherever it runs (Ray Train workers or a sweep trial);
    `report_every_steps`: a sweep's trials also report inside epochs (tune.report_every_steps)."""
    return {
        "config": prep.config.model_dump(mode="json"),
        "tokenizer": prep.data.tokenizer,
        "total_steps": prep.total_steps,
        "report_every_steps": report_every_steps,
        "row_weights": prep.row_weights,
        "replay_samples": prep.replay_samples,
        "cache_train_shard": cache_train_shard(prep),
        "reference_rows": prep.data.reference,
    }


def reference_rows(config: JobConfig, val_rows: ray.data.Dataset | pa.Table) -> dict | None:
    """The first train.eval_generate_rows validation prompts and their responses."""
    if not config.train.eval_generate_rows:
        return None
    sample = first_rows(val_rows, config.train.eval_generate_rows)
    return {"prompts": [r["text"] for r in sample], "references": [r[RESPONSE] for r in sample]}


# A worker keeps its training shard in memory after the first epoch when the shard is at most this
# big (train/loop.py, ShardCache): continual windows, sweeps' trials and small fine-tuning sets.
CACHE_SHARD_BYTES = 256 * 2**20


def cache_train_shard(prep: PreparedRun) -> bool:
    try:
        size = prep.data.train_ds.size_bytes()
    except Exception:  # not materialized: its size is unknown, so it streams
        return False
    return size is not None and size / max(prep.config.scaling.num_workers, 1) <= CACHE_SHARD_BYTES


def worker_resources(prep: PreparedRun) -> dict:
    return worker_resources_for(prep.config, prep.gpu)


def worker_resources_for(config: JobConfig, gpu: bool) -> dict:
    resources = {"CPU": config.scaling.cpus_per_worker}
    if gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return resources


# How often Ray Train's controller polls its workers (Ray's default: every 2 s). Every change of
# a run's state waits for a poll: a short run spent ~4.6 s of its ~38 s on those waits. The
# controller hands it to no one else; a value the user set wins.
CONTROLLER_POLL_S = "0.5"
# How long Ray Train waits for its workers to start (Ray's default: 60 s) before it fails the
# attempt. Each worker imports torch, transformers and DeepSpeed: 14 s for one, 24 s for two on an
# idle 2-core machine (measured 2026-12-02), more on a loaded one; a start that takes longer is
# slow, not failed. Passed on to the controller by Ray Train; a value the user set wins.
WORKER_START_TIMEOUT_S = "600"


def build_trainer(prep: PreparedRun, run_name: str, callbacks=(), report_every_steps: int | None = None) -> TorchTrainer:
    """Checkpoints go to <root>/runs/<run_name> on the storage root's filesystem (local, shared, s3)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_START_TIMEOUT_S)
    config = prep.config
    resources = worker_resources(prep)
    ckpt = config.train.checkpoint
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(prep, report_every_steps),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=prep.gpu,
            resources_per_worker=resources,
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=prep.storage.path("runs"),
            storage_filesystem=prep.storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ckpt.num_to_keep,
                checkpoint_score_attribute=ckpt.score_attribute,
                checkpoint_score_order=ckpt.score_order,
            ),
            callbacks=list(callbacks),
        ),
        datasets={"train": prep.data.train_ds, "validation": prep.data.val_ds},
    )


def run_training(config: JobConfig, resume: bool = False) -> TrainingOutcome:
    """Train per the config on the connected Ray cluster, then register the best checkpoint.

    A run is its config and its data: started again with both unchanged (after a crash, a lost
    driver), it resumes from its checkpoints; with either changed it is another run. Without
    `run_name` the run is named after both, so a changed one starts afresh; a `run_name` that
    already holds a different run is refused unless `resume` (continue it anyway).
    """
    storage = Storage(config.storage.root)
    registry = Registry(storage)
    config = pin_init_from(config, registry)
    validated = read_run_data(config, storage)
    config = settle_run(config, storage, validated.report, resume)
    run_name = config.run_name
    finished = finished_run(storage, config, run_name)
    if finished is not None:
        # Run again (the same command, a job retried after its driver registered nothing):
        # workers would resume after the last epoch and train nothing.
        say(f"[lifelong] run '{run_name}' finished its {config.train.epochs} epoch(s) already: nothing to train")
        registered = already_registered(config, registry, finished, run_name, validated.report)
        if registered is not None:  # nothing to train or register: the data need not be tokenized
            return registered
    if finished is None:
        tracking.begin(config, run_name)  # MLflow: the run's, before any work (an unreachable server stops it here)
    if finished is None and trains_warm(config, storage, run_name):
        warm_trainer(worker_resources_for(config, use_gpu(config)))  # starts importing while the data is tokenized
    prep = prepare_run(config, prepare_data(config, storage, registry, validated))
    if finished is not None:  # looked up above: not registered yet
        return register_checkpoint(prep, finished, run_name)
    say(
        f"[lifelong] run '{run_name}': {prep.data.train_examples} training examples, {prep.total_steps} optimizer steps "
        f"on {config.scaling.num_workers} worker(s){' with GPUs' if prep.gpu else ''}"
    )
    try:
        result = fit(prep, run_name)
    except ray.train.TrainingFailedError as e:
        raise LifelongError(f"training run '{run_name}' failed: {e}") from None
    except ray.exceptions.RayActorError as e:  # its controller (or the warm actor) was killed
        raise LifelongError(
            f"training run '{run_name}' stopped: {first_line(e, 300)}; the same command again resumes it from its last checkpoint"
        ) from None
    except ray.exceptions.RayTaskError as e:  # the warm actor's loop raised
        if isinstance(e.cause, LifelongError):
            raise e.cause from None
        raise LifelongError(f"training run '{run_name}' failed: {first_line(e, 2000)}") from None
    finally:  # a run whose controller died leaves its workers reserved while this driver lives
        release_orphaned_workers(f"run '{run_name}'")
    if result.error:
        raise LifelongError(f"training run '{run_name}' failed: {result.error}")
    return register_best(prep, result, run_name)


def fit(prep: PreparedRun, run_name: str):
    """Train the run, resuming it from its checkpoints: one worker in this driver's warm actor
    (train/warm.py), more in a Ray Train run. A Ray Train run starts a controller, a worker group,
    data coordinators and helpers, each a process importing Ray and most of them torch: a tiny
    one-worker run took 46.9 s there against 25.0 s in a fresh warm actor and 7.3 s in one
    already started (medians, benchmarks/one_worker_runs.py). A run begun in Ray Train (its
    snapshot is stored) resumes there."""
    config = prep.config
    with training_bar(run_name, prep.total_steps):
        if not trains_warm(config, prep.storage, run_name):
            return build_trainer(prep, run_name).fit()
        datasets = {"train": prep.data.train_ds, "validation": prep.data.val_ds}
        run = stored_run(prep.storage, config, run_name)
        return train_warm(loop_config(prep), datasets, prep.gpu, run, worker_resources(prep), config.train.max_failures)


def stored_run(storage: Storage, config: JobConfig, run_name: str) -> StoredRun:
    """The run's checkpoints as a warm actor stores them."""
    ckpt = config.train.checkpoint
    return StoredRun(storage, run_name, ckpt.num_to_keep, ckpt.score_attribute, ckpt.score_order)


def trains_warm(config: JobConfig, storage: Storage, run_name: str) -> bool:
    """Whether `fit` trains the run in the warm actor: one worker, and not a run begun in Ray Train."""
    return config.scaling.num_workers == 1 and not _ray_train_run(storage, run_name)


def _ray_train_run(storage: Storage, run_name: str) -> bool:
    return storage.exists(f"runs/{run_name}/checkpoint_manager_snapshot.json")


def finished_run(storage: Storage, config: JobConfig, run_name: str):
    """The stored result of a run (Ray Train's or a warm actor's) whose latest checkpoint is its last epoch, else None."""
    if _ray_train_run(storage, run_name):
        result = ray.train.Result.from_path(storage.path(f"runs/{run_name}"), storage_filesystem=storage.fs)
    else:
        result = stored_run(storage, config, run_name).result()
    return result if result.metrics and result.metrics.get("epoch", 0) >= config.train.epochs else None


def pin_init_from(config: JobConfig, registry: Registry) -> JobConfig:
    """Resolve model.init_from once: an alias becomes NAME:VERSION for the driver, the workers and
    the card alike (an alias moved during the run changes nothing)."""
    if not config.model.init_from:
        return config
    parent = registry.resolve(config.model.init_from, weights=False)
    if parent.name is None:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"init_from": parent.ref})})


# What a run's identity is made of: what changes the weights it trains. Everything else (where
# it runs, how often it logs, its retry budget, exports, serving, sweeps, cycles) may change
# between a stop and its resume.
_RUN_IDENTITY = {
    "model": None,
    "data": {"path", "in_process_mb"},
    "train": {"max_failures", "log_every_steps", "checkpoint"},
    "scaling": {"placement_strategy", "cpus_per_worker", "gpus_per_worker"},
}


def run_identity(config: JobConfig, report: DataReport) -> dict:
    dumped = config.model_dump(mode="json")
    identity = {
        section: {k: v for k, v in dumped[section].items() if k not in (skip or ())}
        for section, skip in _RUN_IDENTITY.items()
        if dumped.get(section) is not None
    }
    identity["data_files"] = sorted(f.sha256 for f in report.used_files)
    return identity


def settle_run(config: JobConfig, storage: Storage, report: DataReport, resume: bool) -> JobConfig:
    """The run's name (derived from its identity unless given) and its identity record
    (`runs/<name>/lifelong-run.json`); refuses to mix two runs under one name."""
    identity = run_identity(config, report)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    name = config.run_name or f"{config.default_run_name}-{digest[:10]}"
    rel = f"runs/{name}/lifelong-run.json"
    record = {"identity": identity, "digest": digest}
    if not storage.exists(rel) and storage.exists(f"runs/{name}/checkpoint_manager_snapshot.json") and not resume:
        raise ConfigError(
            f"run_name '{name}' holds checkpoints of a run that recorded no identity (started by an older "
            "version): pass another run_name=…, or --resume to continue it anyway"
        )
    if not storage.create_exclusive(rel, json.dumps(record, indent=2, sort_keys=True).encode()):
        held = storage.read_json(rel)
        if held.get("digest") != digest:
            changed = _changed_keys(held.get("identity", {}), identity)
            if not resume:
                raise ConfigError(
                    f"run_name '{name}' already holds another run under {storage.uri_of('runs', name)} "
                    f"(changed since: {', '.join(changed) or 'its config'}): its checkpoints belong to that config and data. "
                    f"Pass another run_name=…, drop run_name to get one named after this config and data, "
                    f"or add --resume to continue '{name}' anyway"
                )
            say(f"[lifelong] --resume: continuing run '{name}' although {', '.join(changed)} changed")
        else:
            say(f"[lifelong] run '{name}' exists with the same config and data: resuming it from its checkpoints")
    return config.model_copy(update={"run_name": name})


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        else:
            keys.append("data files" if k == "data_files" else f"{prefix}{k}")
    return keys


def _best(config: JobConfig, result, run_name: str):
    ckpt = config.train.checkpoint
    best = best_checkpoint(result, ckpt.score_attribute, ckpt.score_order)
    if best is None:
        raise LifelongError(f"training run '{run_name}' reported no checkpoint")
    return best


def already_registered(config: JobConfig, registry: Registry, result, run_name: str, report: DataReport) -> TrainingOutcome | None:
    """The outcome of a run whose best checkpoint is registered already (re-running a finished
    run resumes it with nothing left to do: no duplicate version), else None."""
    checkpoint, _ = _best(config, result, run_name)
    already = registry.find_versions(config.name, lambda card: card.run is not None and card.run.checkpoint == checkpoint.path)
    if not already:
        return None
    card = registry.card(config.name, already[0])
    say(f"[lifelong] the best checkpoint is already registered as {config.name}:{already[0]}")
    epochs = [h["epoch"] for h in card.run.history]
    return TrainingOutcome(run_name, result.path, already[0], config.name, card.metrics, report, epochs)


def register_best(prep: PreparedRun, result, run_name: str, extra_card: dict | None = None) -> TrainingOutcome:
    """Register the run's best checkpoint (once: a re-run that finds it registered reuses it)."""
    already = already_registered(prep.config, prep.registry, result, run_name, prep.data.report)
    return already if already is not None else register_checkpoint(prep, result, run_name, extra_card)


def register_checkpoint(prep: PreparedRun, result, run_name: str, extra_card: dict | None = None) -> TrainingOutcome:
    """Register the run's best checkpoint as a new version (`register_best` checks it is not one yet)."""
    config, registry, report = prep.config, prep.registry, prep.data.report
    checkpoint, metrics = _best(config, result, run_name)
    with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="lifelong-export-") as work:
        state = _read_json(Path(ckpt_dir) / "state.json")
        card = {
            "task": config.model.task,
            "labels": config.data.labels,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "config": config.model_dump(mode="json"),
            "data": report.to_dict(),
            "parent": prep.parent.ref if prep.parent else None,
            "base": prep.parent.ref if config.train.lora else None,  # the version holds only adapters
            "run": {
                "name": run_name,
                "checkpoint": checkpoint.path,
                "history": state.get("history", []),
                "precision": state.get("precision"),
            },
            **(extra_card or {}),
        }
        model_dir = Path(ckpt_dir) / "hf"
        if config.train.lora and should_export_on_register(config.export, config.model.task):  # exports are of the merged model
            model_dir = Path(work) / "merged"
            merge_adapter(prep.parent.local_dir, Path(ckpt_dir) / "hf", model_dir, config.model.task, config.data.labels)
        exported = export_on_register(config, model_dir, prep.data.validation_rows, work, onnx_template(prep.parent, config))
        card["exports"] = exported.records
        version = registry.register_version(config.name, Path(ckpt_dir) / "hf", card, extra_files=exported.files)
    tracking.registered(
        config, run_name, f"{config.name}:{version}", registry.storage.uri_of("registry", config.name, "versions", str(version))
    )
    epochs = [h["epoch"] for h in state.get("history", [])]
    return TrainingOutcome(run_name, result.path, version, config.name, card["metrics"], report, epochs)


def onnx_template(parent: ResolvedModel | None, config: JobConfig) -> OnnxTemplate | None:
    """The parent version's ONNX graph, when it was exported as this run would be (same opset and
    sequence length, weights inside the file): a cycle's candidate then reuses its champion's."""
    if parent is None or parent.card is None or "onnx" not in parent.card.exports or parent.card.task != config.model.task:
        return None
    record = parent.card.exports["onnx"]
    onnx_path = parent.local_dir / "model.onnx"
    same = record.max_length == config.model.max_length and record.opset == config.export.opset
    if not same or not onnx_path.is_file() or (parent.local_dir / "model.onnx.data").exists():
        return None
    return OnnxTemplate(onnx_path, parent.local_dir, parent.ref)


def export_on_register(
    config: JobConfig,
    model_dir: Path,
    validation_rows: ray.data.Dataset | pa.Table | None,
    workdir: str,
    template: OnnxTemplate | None = None,
) -> ExportResult:
    """ONNX (and a gated int8 variant) of a new version, built before it is registered."""
    task = config.model.task
    if not should_export_on_register(config.export, task):
        return ExportResult()
    formats = export_formats(task, config.export.int8, config.export.torchscript)
    rows = first_rows(validation_rows, config.export.eval_rows) if "onnx-int8" in formats and validation_rows is not None else None
    exported = export_files(model_dir, task, config.model.max_length, config.export, workdir, rows, formats, template)
    if exported.records:
        say(
            "[lifelong] export "
            + "; ".join(
                f"{fmt}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
                for fmt, record in exported.records.items()
            )
        )
    for fmt, reason in exported.refused.items():
        say(f"[lifelong] export {fmt} refused: {reason}")
    return exported


def best_checkpoint(result, attribute: str, order: str):
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if attribute in m]
    if candidates:
        pick = min if order == "min" else max
        return pick(candidates, key=lambda cm: cm[1][attribute])
    if result.checkpoint is not None:
        return result.checkpoint, result.metrics or {}
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
