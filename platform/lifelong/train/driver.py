"""The driver of a training run: data → tokenizer → TorchTrainer (DeepSpeed workers) → registry.

    read + validate (Ray Data) ─▶ tokenizer (given, from init_from, or trained on the corpus)
        ─▶ TorchTrainer(datasets=train/validation) ─▶ best checkpoint ─▶ registry version
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from lifelong.config import JobConfig
from lifelong.data import DataReport, read_validated, text_iterator, tokenized
from lifelong.errors import ConfigError, DataError, LifelongError
from lifelong.export import ExportResult, export_files, should_export_on_register
from lifelong.models import train_tokenizer
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.train.ds_config import total_optimizer_steps
from lifelong.train.loop import train_loop_per_worker


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


def prepare_tokenizer(config: JobConfig, storage: Storage, registry: Registry, train_texts) -> str:
    """The tokenizer directory: model.tokenizer, else init_from's, else one trained on the corpus.

    A trained tokenizer is stored with the run, so a resumed run reuses exactly the same one.
    """
    if config.model.tokenizer:
        path = Path(config.model.tokenizer).expanduser()
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise ConfigError(f"model.tokenizer='{config.model.tokenizer}' is not a tokenizer directory")
        return str(path.resolve())
    if config.model.init_from:
        return str(registry.resolve(config.model.init_from).local_dir)
    rel = f"runs/{config.resolved_run_name}/tokenizer"
    if not storage.exists(f"{rel}/tokenizer.json"):
        with tempfile.TemporaryDirectory() as tmp:
            train_tokenizer(text_iterator(train_texts, config.model.tokenizer_train_rows), config.model.vocab_size, tmp)
            storage.upload_dir(tmp, rel)
    if storage.is_local:
        return storage.path(rel)
    return str(storage.download_dir(rel, tempfile.mkdtemp(prefix="lifelong-tok-")))


@dataclass
class PreparedData:
    """The run's data, read, validated and tokenized (lazily, or materialized for a sweep)."""

    validated: object  # ValidatedData; None where only the tokenized splits travel (sweep trials)
    report: DataReport
    tokenizer_dir: str
    train_ds: object
    val_ds: object
    train_examples: int
    val_examples: int

    def for_trials(self) -> PreparedData:
        """What every trial of a sweep needs: the tokenized splits, not the raw rows."""
        return dataclasses.replace(self, validated=None)


def prepare_data(config: JobConfig, storage: Storage, registry: Registry, tokenizer_dir: str | None = None,
                 materialize: bool = False) -> PreparedData:
    """Read and validate the data, settle the tokenizer, tokenize and count.

    `materialize` keeps the tokenized splits in the object store (spilling to disk if need be),
    so that the trials of a sweep read them instead of each re-running the pipeline.
    """
    validated = read_validated(config.require_data("training"), storage, quarantine_area=f"runs/{config.resolved_run_name}")
    report = validated.report
    for split in ("train", "validation"):
        if not report.rows.get(split):
            raise DataError(
                f"the {split} split of '{report.source}' is empty ({report.summary()}); "
                "add rows or change data.validation_fraction"
            )
    print(f"[lifelong] data: {report.summary()}", flush=True)

    tokenizer_dir = tokenizer_dir or prepare_tokenizer(config, storage, registry, validated.split("train"))
    max_length = config.model.max_length
    train_ds = tokenized(validated.split("train"), config.model.task, tokenizer_dir, max_length)
    val_ds = tokenized(validated.split("validation"), config.model.task, tokenizer_dir, max_length)
    if materialize:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    # Sizing the schedule needs the number of examples (packed blocks for causal LM).
    return PreparedData(validated, report, tokenizer_dir, train_ds, val_ds, train_ds.count(), val_ds.count())


@dataclass
class PreparedRun:
    """Everything a TorchTrainer needs, read and checked once on the driver."""

    config: JobConfig
    storage: Storage
    registry: Registry
    parent: object
    data: PreparedData
    total_steps: int
    gpu: bool


def prepare_run(config: JobConfig, data: PreparedData | None = None) -> PreparedRun:
    """Check the run against its data (prepared here unless given) and size the schedule."""
    storage = Storage(config.storage.root)
    registry = Registry(storage)
    parent = registry.resolve(config.model.init_from) if config.model.init_from else None
    data = data or prepare_data(config, storage, registry)
    workers = config.scaling.num_workers
    if data.train_examples < workers or data.val_examples < workers:
        raise DataError(
            f"too little data for {workers} workers: {data.train_examples} training and {data.val_examples} validation "
            f"examples of {config.model.max_length} tokens; add data, lower model.max_length or scaling.num_workers"
        )
    total_steps = total_optimizer_steps(config.train, math.floor(data.train_examples / workers))
    gpu = use_gpu(config)
    if not gpu and config.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 needs CUDA GPUs and this cluster has none: use bf16 or fp32")
    return PreparedRun(config, storage, registry, parent, data, total_steps, gpu)


def build_trainer(prep: PreparedRun, run_name: str, callbacks=()) -> TorchTrainer:
    """Checkpoints go to <root>/runs/<run_name> on the storage root's filesystem (local, shared, s3)."""
    config = prep.config
    resources = {"CPU": config.scaling.cpus_per_worker}
    if prep.gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    ckpt = config.train.checkpoint
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "tokenizer_dir": prep.data.tokenizer_dir, "total_steps": prep.total_steps},
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=prep.gpu, resources_per_worker=resources,
                                              placement_strategy=config.scaling.placement_strategy),
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


def run_training(config: JobConfig) -> TrainingOutcome:
    """Train per the config on the connected Ray cluster, then register the best checkpoint."""
    run_name = config.resolved_run_name
    prep = prepare_run(config)
    trainer = build_trainer(prep, run_name)
    print(f"[lifelong] run '{run_name}': {prep.data.train_examples} training examples, {prep.total_steps} optimizer steps "
          f"on {config.scaling.num_workers} worker(s){' with GPUs' if prep.gpu else ''}", flush=True)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise LifelongError(f"training run '{run_name}' failed: {e}") from None
    if result.error:
        raise LifelongError(f"training run '{run_name}' failed: {result.error}")
    return register_best(prep, result, run_name)


def register_best(prep: PreparedRun, result, run_name: str, extra_card: dict | None = None) -> TrainingOutcome:
    """Register the run's best checkpoint (once: a re-run that finds it registered reuses it)."""
    config, registry, report = prep.config, prep.registry, prep.data.report
    ckpt = config.train.checkpoint
    best = _best_checkpoint(result, ckpt.score_attribute, ckpt.score_order)
    if best is None:
        raise LifelongError(f"training run '{run_name}' reported no checkpoint")
    checkpoint, metrics = best
    already = registry.find_versions(config.name, lambda card: card.get("run", {}).get("checkpoint") == checkpoint.path)
    if already:
        # Re-running a finished run resumes it with nothing left to do: no duplicate version.
        card = registry.card(config.name, already[0])
        print(f"[lifelong] the best checkpoint is already registered as {config.name}:{already[0]}", flush=True)
        epochs = [h["epoch"] for h in card["run"].get("history", [])]
        return TrainingOutcome(run_name, result.path, already[0], config.name, card["metrics"], report, epochs)
    with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="lifelong-export-") as work:
        state = _read_json(Path(ckpt_dir) / "state.json")
        card = {
            "task": config.model.task,
            "labels": config.data.labels,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "config": config.model_dump(mode="json"),
            "data": report.to_dict(),
            "parent": prep.parent.ref if prep.parent else None,
            "run": {"name": run_name, "checkpoint": checkpoint.path, "history": state.get("history", []),
                    "precision": state.get("precision")},
            **(extra_card or {}),
        }
        exported = export_on_register(config, Path(ckpt_dir) / "hf", card, prep.data.validated, work)
        card["exports"] = exported.records
        version = registry.register_version(config.name, Path(ckpt_dir) / "hf", card, extra_files=exported.files)
    epochs = [h["epoch"] for h in state.get("history", [])]
    return TrainingOutcome(run_name, result.path, version, config.name, card["metrics"], report, epochs)


def export_on_register(config: JobConfig, model_dir: Path, card: dict, validated, workdir: str) -> ExportResult:
    """ONNX (and a gated int8 variant) of a new version, built before it is registered."""
    task = config.model.task
    if not should_export_on_register(config.export, task):
        return ExportResult()
    classification = task == "sequence-classification"
    formats = ("onnx", "onnx-int8") if classification and config.export.int8 else ("onnx",)
    rows = validated.split("validation").take(config.export.eval_rows) if classification else None
    exported = export_files(model_dir, card, config.export, workdir, rows, formats)
    for fmt, record in exported.records.items():
        print(f"[lifelong] export {fmt}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)), flush=True)
    for fmt, reason in exported.refused.items():
        print(f"[lifelong] export {fmt} refused: {reason}", flush=True)
    return exported


def _best_checkpoint(result, attribute: str, order: str):
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if attribute in m]
    if candidates:
        pick = min if order == "min" else max
        return pick(candidates, key=lambda cm: cm[1][attribute])
    if result.checkpoint is not None:
        return result.checkpoint, result.metrics or {}
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
