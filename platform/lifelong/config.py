"""Typed job configs: one schema (pydantic), one loader (YAML + dotted overrides).

Everything a job needs arrives through a `JobConfig`. A wrong key, type or combination
fails here, before Ray starts, with a message naming the key, the file and the fix.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from lifelong.errors import ConfigError
from lifelong.tasks import DEFAULT as DEFAULT_TASK
from lifelong.tasks import TaskName, task, with_capability


class Section(BaseModel):
    # Unknown keys are errors: a typo such as `train.lrr` must not pass silently.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    task: TaskName = DEFAULT_TASK
    # For a model built from scratch: the HF model type and config keys (GPT-2 family tested).
    architecture: str = "gpt2"
    hf_config: dict[str, Any] = Field(default_factory=dict)
    # Start from weights: a registry reference (NAME@ALIAS, NAME:VERSION) or an HF directory.
    init_from: str | None = None
    # A tokenizer directory; when empty and no init_from, a byte-level BPE is trained on the corpus.
    tokenizer: str | None = None
    vocab_size: int = Field(default=2000, ge=300)
    tokenizer_train_rows: int = Field(default=20000, ge=10)
    max_length: int = Field(default=128, ge=8)
    freeze_embeddings: bool = False
    # Train only the last N transformer blocks plus the task head (None: train everything).
    train_last_n_layers: int | None = Field(default=None, ge=0)
    # A new GPT-2 with Mixture-of-Experts MLPs (a version built so keeps them when fine-tuned).
    moe: MoeSection | None = None


class MoeSection(Section):
    """Mixture of Experts (DeepSpeed MoE): the MLP of every `every_n_layers`-th GPT-2 block becomes
    `num_experts` MLPs behind a learned top-k gate."""

    num_experts: int = Field(default=4, ge=2)
    top_k: Literal[1, 2] = 1
    every_n_layers: int = Field(default=1, ge=1)  # 1: every block; 2: every second block, ...
    capacity_factor: float = Field(default=1.25, gt=0.0)  # tokens an expert takes per step, x its fair share (training)
    aux_loss_weight: float = Field(default=0.01, ge=0.0)  # the gates' load-balancing loss, added to the logged loss
    # Workers the experts are split over (1: every worker holds all of them). More needs a backend
    # with all-to-all (NCCL on GPUs) and must divide num_experts and scaling.num_workers.
    expert_parallel_size: int = Field(default=1, ge=1)


class DataConfig(Section):
    # A file, a directory or a glob; a local path or any pyarrow filesystem URI.
    path: str
    format: Literal["auto", "parquet", "jsonl", "csv", "image"] = "auto"
    text_column: str = "text"
    # Image tasks: the column of encoded image bytes (Parquet binary, base64 text in JSONL/CSV)
    # in table files; image files themselves (.png, .jpg, ...) are one row each, labelled by
    # their folder's name (one sub-folder per class).
    image_column: str = "image"
    # Where the image paths in a table's image column are relative to (a directory or URI;
    # default: the table's own folder). Paths may not climb above it; absolute paths and URIs are
    # read as they are. Keep such images out of data.path / continual.landing, or they are read as
    # image files (labelled by their folder) too.
    image_root: str | None = None
    label_column: str | None = None
    # Instruction fine-tuning (model.task: causal-lm): each row a prompt and the response the
    # model should give (both columns, or neither). The loss counts the response's tokens only;
    # the prompt goes through the tokenizer's chat template when it has one. Each row is padded
    # to model.max_length (a prompt too long keeps its end; a response too long is cut).
    prompt_column: str | None = None
    response_column: str | None = None
    # Instruction rows several to a block of model.max_length, whole and in order (a row that does
    # not fit starts the next block; only the blocks' ends are padded), instead of one padded row
    # per block: fewer, fuller blocks. A row attends to the rows before it in its block.
    pack: bool = False
    # The label set for classification; rows with other labels are dropped and counted.
    labels: list[str] | None = None
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    # Fixed salt of the content hash that splits train/validation; change it only to reshuffle.
    split_salt: str = "lifelong"
    # Light augmentation of training images (never of validation): a random horizontal flip, and
    # a random crop of the image padded by this many pixels on each side (0: none).
    augment_flip: bool = False
    augment_crop_padding: int = Field(default=0, ge=0)
    # Data files of at most this many MB in all (and continual windows of as many bytes of rows,
    # and a cycle's holdouts, scored) are read, validated and tokenized in the driver's own
    # process: a command's fresh Ray workers spend seconds importing before their first file.
    # Larger data goes through Ray tasks and Ray Data, spread over the cluster's CPUs. 0: always
    # through Ray.
    in_process_mb: float = Field(default=16, ge=0)
    # What a row holds, "text" or "image": the task's (set from model.task by JobConfig).
    _content: str = PrivateAttr(default="text")
    # A continual stream with `continual.new_labels: grow`: a label that is not in `labels` is
    # recorded as new (the cycle then grows the label set) instead of dropped as unknown.
    _grow_labels: bool = PrivateAttr(default=False)

    @property
    def content(self) -> str:
        return self._content

    @property
    def grow_labels(self) -> bool:
        return self._grow_labels

    def with_labels(self, labels: list[str], grow: bool) -> DataConfig:
        """This config judging rows against `labels` (a stream's grown set), new labels kept as new (`grow`)."""
        copy = self.model_copy(update={"labels": list(labels)})
        copy._content, copy._grow_labels = self._content, grow
        return copy

    @property
    def content_column(self) -> str:
        """The column of a table row's content: its image, its prompt, or its text."""
        if self._content == "image":
            return self.image_column
        return self.prompt_column or self.text_column

    @model_validator(mode="after")
    def _labels_unique(self) -> DataConfig:
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("data.prompt_column and data.response_column go together: set both (instruction data) or neither")
        if self.pack and self.response_column is None:
            raise ValueError("data.pack packs instruction rows (data.prompt_column/response_column); plain text is always packed")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("data.labels needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"data.labels has duplicates: {self.labels}")
        return self


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    # Raw DeepSpeed keys merged last, for anything the typed keys do not cover.
    extra: dict[str, Any] = Field(default_factory=dict)


class CheckpointSection(Section):
    num_to_keep: int | None = Field(default=2, ge=1)
    score_attribute: str = "val_loss"
    score_order: Literal["min", "max"] = "min"


class LoraSection(Section):
    """Low-rank adapters (PEFT's LoRA) on a pretrained model's chosen layers: only they train (and
    a classifier's head, whole), and the registered version holds them alone, naming the version
    they adapt (its `base`)."""

    r: int = Field(default=8, ge=1)  # the adapters' rank
    alpha: float = Field(default=16.0, gt=0.0)  # their scale is alpha / r
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # Module names (or name suffixes) to adapt; empty: PEFT's choice for the architecture
    # (GPT-2: its attention projection c_attn).
    target_modules: list[str] | None = None


class TrainConfig(Section):
    epochs: int = Field(default=2, ge=1)
    # Per-worker micro-batch; the global batch is batch_size * workers * accumulation.
    batch_size: int = Field(default=16, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-4, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every_steps: int = Field(default=10, ge=1)
    # Stop an epoch after this many optimizer steps (for smoke runs and benchmarks).
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=0, ge=-1)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    # Train low-rank adapters on model.init_from instead of its weights (None: train the model).
    lora: LoraSection | None = None
    # Instruction data: after each epoch the model answers this many validation prompts (greedy,
    # at most serve.max_new_tokens) and val_bleu, val_chrf, val_exact_match are reported with the
    # epoch's metrics, for tune.metric or checkpoint.score_attribute. 0: not measured.
    eval_generate_rows: int = Field(default=0, ge=0)


class ScalingSection(Section):
    num_workers: int = Field(default=2, ge=1)
    # "auto": use GPUs when the cluster has them.
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, gt=0)
    # How the workers' bundles are placed: PACK fills a node first; SPREAD puts them on
    # different nodes where it can (STRICT_SPREAD: only then).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


class StorageSection(Section):
    # A local directory or a pyarrow filesystem URI (s3://bucket/prefix, gs://...).
    root: str = "./lifelong-store"


class RayConfig(Section):
    # None: RAY_ADDRESS if set, else an embedded local Ray.
    address: str | None = None
    # Logical CPUs of an embedded local Ray (None: enough for the workers plus data tasks).
    num_cpus: int | None = Field(default=None, ge=1)


class ExportSection(Section):
    # When a new version is registered: "auto" exports classification models to ONNX.
    on_register: Literal["auto", "always", "never"] = "auto"
    opset: int = Field(default=18, ge=14)
    # Largest |ONNX logit - PyTorch logit| accepted on the sample inputs (fp32).
    parity_tolerance: float = Field(default=1e-4, gt=0.0)
    # Also build an int8 dynamically quantized variant (classification only).
    int8: bool = True
    # The int8 variant is kept only if its validation accuracy is at most this much lower
    # (a fraction: 0.01 = one point).
    int8_max_accuracy_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    # Validation rows scored to measure the int8 accuracy drop.
    eval_rows: int = Field(default=2000, ge=10)
    # Also trace a TorchScript module (classifiers; parity-checked like ONNX), served with
    # serve.backend=torchscript: PyTorch's runtime without the model's Python code.
    torchscript: bool = False


class AutoscalingSection(Section):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)


class AuthSection(Section):
    # Bearer-token auth is on when either is set: the token comes from this environment
    # variable or file, read by `lifelong serve` (replicas only ever see its SHA-256).
    token_env: str | None = None
    token_file: str | None = None


class PredictionLogSection(Section):
    # The share of requests whose inputs and answers the replicas record (whole requests, picked
    # by their request id), as Parquet under <root>/predictions/<model>/; POST /v1/feedback is open
    # with it, and a stream's cycle lands the labelled rows (lifelong.feedback).
    sample: float = Field(gt=0.0, le=1.0)
    # Days of records and feedback kept (older days are deleted).
    retention_days: int = Field(default=30, ge=1)
    # A replica writes what it recorded from a thread of its own, one file per flush.
    flush_interval_s: float = Field(default=5.0, gt=0.0)
    # Records a replica holds while the store is slow or down; beyond that, new ones are dropped
    # and counted (a request is never slowed or failed by its record).
    max_buffered: int = Field(default=10000, ge=1)


class ShadowSection(Section):
    # The alias whose version answers a share of requests next to the champion's, in the
    # background: its answers are never returned, only compared (agreement, latency, accuracy).
    alias: str = Field(default="challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    share: float = Field(default=0.2, gt=0.0, le=1.0)


class ServeSection(Section):
    # The registry model to follow (default: the config's `name`) and the alias it follows.
    model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # Classification backend; causal-LM versions always generate with PyTorch.
    backend: Literal["onnx", "onnx-int8", "torchscript", "torch"] = "onnx"
    app_name: str | None = None
    # Where the API lives under the HTTP proxy (several apps share one proxy per cluster).
    route_prefix: str = Field(default="/", pattern=r"^/[A-Za-z0-9_/-]*$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # The HTTP ingress: Serve's proxy actor, or HAProxy forwarding straight to the replicas (Ray
    # Serve's HAProxy mode with its throughput-optimized settings; needs `lifelong[haproxy]` or a
    # haproxy on PATH). The same API, token and host; a cluster's nodes must start in that mode.
    ingress: Literal["proxy", "haproxy"] = "proxy"
    num_replicas: int = Field(default=2, ge=1)
    # When set, Serve autoscales between min and max replicas instead of num_replicas.
    autoscaling: AutoscalingSection | None = None
    cpus_per_replica: float = Field(default=1, ge=0)
    # GPUs per replica (fractions share one): above 0, replicas run on CUDA, ONNX Runtime with its
    # CUDA provider (needs onnxruntime-gpu on those nodes) or PyTorch (serve.backend=torch).
    gpus_per_replica: float = Field(default=0, ge=0)
    threads_per_replica: int = Field(default=1, ge=1)
    # Batching: requests that queue while the model runs go together into its next call (at most
    # max_batch_size); an idle replica runs a lone request at once. batch_wait_timeout_s > 0 also
    # waits that long for a fuller batch. max_ongoing_requests defaults to 2 x max_batch_size.
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    # Request limits: more texts, or longer texts (in characters), get a 4xx.
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=20000, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    # Image classifiers: more images, a larger image (encoded bytes) or more pixels get a 4xx.
    # Images arrive as base64 in JSON ({"images": [...]}) or as multipart/form-data files named
    # "images"; raise max_body_bytes with these.
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_bytes: int = Field(default=2_000_000, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=64)
    # A /v1/* request body above this many bytes gets 413 before it is parsed; a body that has
    # not arrived within body_timeout_s gets 408 (a trickling client cannot hold a replica).
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    body_timeout_s: float = Field(default=10.0, gt=0.0)
    # A swap holds requests while the running ones finish; a hold that has not drained within
    # hold_timeout_s is aborted (the old version keeps serving) and retried with a doubled
    # window, up to four times this.
    hold_timeout_s: float = Field(default=5.0, gt=0.0)
    # How often the follower reads the alias from the registry.
    poll_interval_s: float = Field(default=1.0, gt=0.0)
    # A class-label set that differs from the serving version's is refused unless allowed: true
    # accepts any; "grow" only one that keeps the serving labels, in order, and adds new ones at
    # the end (a stream with continual.new_labels: grow).
    allow_label_change: bool | Literal["grow"] = False
    # One log line per request from the proxy and every replica (costly on small machines).
    access_log: bool = False
    auth: AuthSection = Field(default_factory=AuthSection)
    # Record sampled requests and their answers, and take labels for them (None: off).
    log_predictions: PredictionLogSection | None = None
    # A second version (another alias) answering a share of requests in the background (None: off).
    shadow: ShadowSection | None = None

    @model_validator(mode="after")
    def _batching(self) -> ServeSection:
        if self.shadow is not None and self.shadow.alias == self.alias:
            raise ValueError(f"serve.shadow.alias={self.shadow.alias} is the alias served: name another (e.g. challenger)")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.max_ongoing_requests={self.max_ongoing_requests} is below serve.max_batch_size="
                f"{self.max_batch_size}: batches never exceed a replica's ongoing requests, raise it"
            )
        if self.autoscaling and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("serve.autoscaling.min_replicas is above serve.autoscaling.max_replicas")
        return self


# Search-space kinds and how many arguments each takes (None: a non-empty list of options).
SPACE_KINDS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


_EXPONENT = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")


def _number(value):
    if isinstance(value, str):
        try:
            as_float = float(value)
        except ValueError:
            return value
        return int(as_float) if as_float.is_integer() and "." not in value and "e" not in value.lower() else as_float
    return value


def checked_space(space: dict, where: str, grid_refusal: str | None) -> dict:
    """A search space ({dotted key: {kind: args}}) in its normal form, or ValueError naming the
    key; `grid_refusal` (set): why a grid is not taken here."""
    out = {}
    for key, spec in space.items():
        at = f"{where}.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ValueError(f"{at}: give exactly one of {', '.join(SPACE_KINDS)}, e.g. {{loguniform: [1e-5, 1e-2]}} (got {spec!r})")
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ValueError(f"{at}: {kind} needs a non-empty list of options (got {args!r})")
            if kind == "grid" and grid_refusal:
                raise ValueError(f"{at}: {grid_refusal}")
            # Only YAML 1.1's exponent-without-dot floats (3e-3) are taken as numbers here: a
            # choice may hold strings that merely look numeric ("1") for a string key.
            out[key] = {kind: [_number(a) if isinstance(a, str) and _EXPONENT.match(a) else a for a in args]}
            continue
        # YAML 1.1 reads 1e-5 (no dot) as a string: take numeric strings as numbers.
        args = [_number(a) for a in args] if isinstance(args, list) else args
        if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"{at}: {kind} needs [low, high] numbers (got {args!r})")
        low, high = args
        if low >= high:
            raise ValueError(f"{at}: {kind} low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{at}: loguniform needs 0 < low < high (a log range cannot reach 0 or below; got {args})")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ValueError(f"{at}: randint needs integer bounds (got {args})")
        out[key] = {kind: args}
    return out


def probe_values(spec: dict) -> list:
    """Values that stand for the whole range of one space entry when checking they make valid configs."""
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":  # the upper bound is excluded (as in Tune)
        return [args[0], args[1] - 1]
    return list(args)


class TuneSection(Section):
    # Config key → one distribution, e.g. {"train.lr": {"loguniform": [1e-5, 1e-2]},
    # "train.batch_size": {"choice": [8, 16]}, "model.train_last_n_layers": {"randint": [1, 4]}}.
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search: Literal["optuna", "random"] = "optuna"  # Optuna TPE (seeded) or random sampling
    seed: int = 0
    # Random trials before TPE models the results. None: a quarter of num_samples, 3 to 10
    # (Optuna's own default of 10 would leave sweeps under 10 trials purely random).
    startup_trials: int | None = Field(default=None, ge=1)
    scheduler: Literal["asha", "none"] = "asha"  # ASHA early stopping on the epochs trained (fractional inside one)
    # In epochs: a trial runs at least this long before ASHA may stop it (below 1 with
    # report_every_steps, so a long first epoch need not be trained to the end).
    grace_period: float = Field(default=1, gt=0)
    # Also validate and report every N optimizer steps inside an epoch, so that ASHA can act
    # before a long epoch ends (None: once per epoch). Only those ends checkpoint.
    report_every_steps: int | None = Field(default=None, ge=1)
    reduction_factor: float = Field(default=2, gt=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(default=8, ge=1)
    # None: as many as the cluster fits (workers x CPUs per worker for each trial).
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    # The sweep stops once more trials than this have failed (an exception, a NaN loss).
    max_failed_trials: int = Field(default=2, ge=0)
    sweep_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @model_validator(mode="after")
    def _space_shapes(self) -> TuneSection:
        grid = (
            None
            if self.search == "random"
            else "a grid is enumerated, every value in turn (each num_samples times), which Optuna does not do: "
            "set tune.search=random, or use choice for Optuna to pick from"
        )
        self.space.update(checked_space(self.space, "tune.space", grid))  # in place: assigning would validate again
        return self

    @property
    def optuna_startup_trials(self) -> int:
        return self.startup_trials or min(10, max(3, self.num_samples // 4))


class GatesSection(Section):
    # The candidate may score this much below the champion on the new window's holdout.
    new_window_tolerance: float = Field(default=0.01, ge=0.0, le=1.0)
    # Largest mean accuracy drop against the champion on the past windows' holdouts.
    max_forgetting: float = Field(default=0.05, ge=0.0, le=1.0)
    # When set, the candidate must beat the champion on the new window by at least this much
    # (e.g. 0.005): a cycle that learned nothing is not promoted. Replaces new_window_tolerance.
    min_gain: float | None = Field(default=None, ge=0.0, le=1.0)
    # Gates on perplexity (model.task: causal-lm), relative to the champion's on each window:
    # the candidate's perplexity on the new window must be at least this fraction lower (0: not
    # higher) ...
    min_relative_improvement: float = Field(default=0.0, ge=-1.0, lt=1.0)
    # ... and its mean rise on the past windows (candidate / champion - 1) at most this.
    max_relative_increase: float = Field(default=0.05, ge=0.0)
    # What the gates compare (default: the task's, accuracy or perplexity). A language model
    # learning instructions (data.response_column) may gate on its greedy answers to each
    # window's holdout prompts: bleu or chrf (sacrebleu, 0-100; the tolerances above read them as
    # fractions: new_window_tolerance 0.01 = one point) or exact_match; the matrix holds it too.
    metric: Literal["accuracy", "perplexity", "bleu", "chrf", "exact_match"] | None = None
    # How many of each window's holdout prompts a generation metric answers (the first ones;
    # each answer at most serve.max_new_tokens).
    generate_rows: int = Field(default=64, ge=1)


# The continual.* keys a cycle's search may set: how a candidate trains from the champion.
SEARCHED_CONTINUAL_KEYS = ("continual.replay_ratio", "continual.replay_weighting", "continual.replay_refresh", "continual.distill_weight")


class CycleSearchSection(Section):
    # Candidates a cycle trains from the champion, each with settings Optuna's TPE picks (seeded
    # per window, warm-started with the stream's earlier trials); the best goes to the gates.
    num_samples: int = Field(default=4, ge=2)
    # Config key → one distribution, as in tune.space (no grid): train.* keys and
    # continual.replay_ratio, e.g. {train.lr: {loguniform: [1e-4, 1e-2]}, train.epochs: {choice: [1, 2, 3]}}.
    space: dict[str, dict[str, Any]]
    # A trial's score: its accuracy gain over the champion on the new window minus this weight
    # times its forgetting (mean accuracy drop against the champion on the past windows); for a
    # language model, both relative to the champion's perplexity.
    forgetting_weight: float = Field(default=1.0, ge=0)
    # Random trials before TPE models the results (the stream's earlier trials count).
    startup_trials: int = Field(default=2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _space_shapes(self) -> CycleSearchSection:
        if not self.space:
            raise ValueError("continual.search.space: name at least one key to search, e.g. {train.lr: {loguniform: [1e-4, 1e-2]}}")
        self.space.update(checked_space(self.space, "continual.search.space", "a grid is enumerated, which Optuna does not do: use choice"))
        for key in self.space:
            if not (key.startswith("train.") or key in SEARCHED_CONTINUAL_KEYS):
                raise ValueError(
                    f"continual.search.space.{key}: a cycle searches how it trains from the champion: "
                    f"train.* keys and {', '.join(SEARCHED_CONTINUAL_KEYS)}"
                )
        return self


class PromotionSection(Section):
    # Live gates. A candidate that passed the offline gates goes to `challenger` (kind candidate),
    # answers in shadow (serve.shadow, alias challenger), and the endpoint makes it `champion`
    # once it has answered this many requests in shadow with at least min_agreement of its labels
    # the champion's and (when set) a p95 at most max_p95_ms; else it stays challenger, the reason
    # in the alias history. The endpoint judges: serve the stream with this config.
    shadow_requests: int = Field(default=200, ge=1)
    min_agreement: float = Field(default=0.8, ge=0.0, le=1.0)
    max_p95_ms: float | None = Field(default=None, gt=0.0)
    # After any move of `champion` (a promotion, by the gates or by hand), the endpoint watches the
    # new champion this long against the previous one and rolls back on a regression: once it has
    # answered min_requests, an error rate above the previous one's by max_error_rate_increase, or
    # a p95 above the previous one's by the fraction max_p95_increase; once both have min_feedback
    # labelled answers (serve.log_predictions), an accuracy below the previous one's by max_accuracy_drop.
    watch_s: float = Field(default=600.0, gt=0.0)
    min_requests: int = Field(default=50, ge=1)
    max_error_rate_increase: float = Field(default=0.01, ge=0.0, le=1.0)
    max_p95_increase: float = Field(default=0.5, ge=0.0)
    min_feedback: int = Field(default=20, ge=1)
    max_accuracy_drop: float = Field(default=0.05, ge=0.0, le=1.0)


class DriftSection(Section):
    # The champion answers the pending rows and the past windows' holdouts (at most max_rows of
    # each, sampled): a classifier's predicted classes (chi-square test) and confidence (KS test)
    # are compared, each at p_value / 2; a language model's loss per row (KS test) at p_value.
    # Drift: p below that and an effect (total variation, KS statistic) of at least min_distance,
    # so that a large window's tiny shift is not drift (continual/drift.py).
    p_value: float = Field(default=0.01, gt=0.0, lt=1.0)
    min_distance: float = Field(default=0.1, ge=0.0, le=1.0)
    max_rows: int = Field(default=1000, ge=20)


class ContinualSection(Section):
    # Name of the stream under <root>/streams/ (default: the config's name).
    stream: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Where new data files arrive: a directory or a URI (Parquet, JSONL, CSV).
    landing: str | None = None
    strategy: Literal["naive", "replay"] = "replay"
    # A cycle starts when this many new rows are pending, or when the oldest pending file has
    # waited max_wait_s (None: never start on age alone).
    min_new_rows: int = Field(default=100, ge=1)
    max_wait_s: float | None = Field(default=None, gt=0)
    poll_interval_s: float = Field(default=60.0, gt=0)
    # At most this many new rows per cycle (whole files, oldest first; the rest stays pending for
    # the next cycle), so a backlog never has to fit in the driver at once. A single file larger
    # than this is trained on alone.
    max_rows_per_cycle: int = Field(default=50000, ge=1)
    # A window whose training fails this many times is given up: its files are quarantined with
    # the error (`lifelong continual requeue` retries them once the cause is fixed).
    max_attempts: int = Field(default=3, ge=1)
    # The training runs (checkpoints) of this many most recent finished windows are kept under
    # runs/; older ones are deleted when a window is done (their versions stay in the registry).
    keep_runs: int = Field(default=2, ge=1)
    replay_capacity: int = Field(default=5000, ge=1)
    # Replay rows drawn per new training row (replay strategy).
    replay_ratio: float = Field(default=2.0, gt=0)
    # Distillation on replayed rows (replay strategy): the candidate's loss adds this weight times
    # the mean squared difference between its logits and the champion's on the replayed rows of
    # each batch, so old windows keep their answers as well as their labels (0: labels alone).
    distill_weight: float = Field(default=0.0, ge=0)
    # How the cycle's loss weighs the replayed rows against the window's new ones (replay strategy).
    # rows: every row alike, so the new window is half of a ratio-1 cycle's loss however many
    # windows came before. history: the replayed rows stand for all rows trained on before (the
    # buffer's count), so the new window weighs what it would in full retraining on everything.
    replay_weighting: Literal["rows", "history"] = "history"
    # Which replayed rows each epoch of a cycle trains on (replay strategy). epoch: a sample of its
    # own per epoch (replay_ratio rows per new row each), drawn so that the epochs together cover
    # as much of the buffer as they can; the same cost as cycle, which trains every epoch on one.
    replay_refresh: Literal["epoch", "cycle"] = "epoch"
    gates: GatesSection = Field(default_factory=GatesSection)
    # A label that is not in data.labels: refuse drops its rows (unknown_label) and quarantines
    # image files in a folder of that name; grow adds it to the stream's label set (kept under
    # streams/<stream>/labels.json, data.labels first), and the cycle's candidate grows its
    # classification head from the champion's (the old classes' weights kept).
    new_labels: Literal["refuse", "grow"] = "refuse"
    # A small search of the cycle's own (None: one candidate, trained with the config as it is).
    search: CycleSearchSection | None = None
    # Move `champion` to a candidate that passes the gates (false: `challenger` only).
    promote: bool = True
    # Live gates before a promotion, and the watch after one (None: the offline gates promote).
    promotion: PromotionSection | None = None
    # What starts a cycle: rows (min_new_rows pending, or max_wait_s), drift (the pending rows
    # drifted from the last window's, or max_wait_s: rows alone hold back), or any of them.
    trigger: Literal["rows", "drift", "any"] = "rows"
    drift: DriftSection = Field(default_factory=DriftSection)


class SubmitSection(Section):
    # .gitignore-style patterns (relative to the project) that `lifelong submit` leaves behind,
    # besides .gitignore and the defaults (environments, stores, data/, secrets: lifelong.submit).
    exclude: list[str] = Field(default_factory=list)


class TensorBoardSection(Section):
    # A local directory (made absolute where the config is loaded): <dir>/<run>/ per training
    # run, <dir>/<sweep>/ and <dir>/<stream>/ for sweeps and cycles (lifelong.tracking).
    dir: str


class MlflowSection(Section):
    # Where runs go: an `mlflow server` (http://host:port), or any URI MLflow's client takes
    # (sqlite:///…, databricks); its credentials come from MLflow's own variables
    # (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD) on each node.
    uri: str = Field(min_length=1)
    # The MLflow experiment; default: the config's name (a sweep, its trials and the version
    # they became side by side; a stream's cycles under the stream's name).
    experiment: str | None = Field(default=None, min_length=1)

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError(f"'{value}' is not a tracking URI (it holds a space)")
        return value


class TrackingSection(Section):
    # Off by default; needs the `tracking` extra (tensorboard, mlflow-skinny).
    tensorboard: TensorBoardSection | None = None
    mlflow: MlflowSection | None = None

    @model_validator(mode="after")
    def _installed(self) -> TrackingSection:
        import importlib.util

        if self.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard needs the tensorboard package: pip install 'lifelong[tracking]'")
        if self.mlflow is not None and importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow needs MLflow's client: pip install 'lifelong[tracking]' (mlflow-skinny)")
        return self


class NotifySection(Section):
    # JSON POSTs on alias moves, gate rejections, refused swaps, failed cycles and finished
    # sweeps (lifelong.notify); LIFELONG_WEBHOOKS adds URLs for every command.
    webhooks: list[str] = Field(default_factory=list)
    # The variable holding the HMAC-SHA256 key of X-Lifelong-Signature (unset: not signed).
    secret_env: str = Field(default="LIFELONG_WEBHOOK_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    retries: int = Field(default=3, ge=0, le=10)  # after a connection error, a 429 or a 5xx
    timeout_s: float = Field(default=5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _urls(self) -> NotifySection:
        for url in self.webhooks:
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
                raise ValueError(f"webhook {url!r} is not an http(s) URL")
        return self


# What train.eval_generate_rows measures each epoch (tune.metric and checkpoint.score_attribute may name them).
GENERATION_METRICS = ("val_bleu", "val_chrf", "val_exact_match")


class JobConfig(Section):
    # The model's name in the registry; also the base of the deterministic run name.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A run re-started under the same name resumes from its latest checkpoint; one that names a
    # run of another config or data is refused (unless --resume). Empty: named after the config and data.
    run_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Training and evaluation need it; a config that only serves may leave it out.
    data: DataConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    ray: RayConfig = Field(default_factory=RayConfig)
    export: ExportSection = Field(default_factory=ExportSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    continual: ContinualSection = Field(default_factory=ContinualSection)
    submit: SubmitSection = Field(default_factory=SubmitSection)
    notify: NotifySection = Field(default_factory=NotifySection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _combinations(self) -> JobConfig:
        m, t = self.model, self.train
        if self.data is not None:
            self.data._content = task(m.task).CONTENT
        task(m.task).check(self)
        if t.precision == "fp16" and self.scaling.use_gpu is False:
            raise ValueError("train.precision=fp16 needs CUDA but scaling.use_gpu is false: use train.precision=bf16 or fp32 on CPUs")
        if m.train_last_n_layers is not None and m.init_from is None:
            raise ValueError(
                "model.train_last_n_layers freezes pretrained layers, but model.init_from is "
                "empty: set model.init_from or remove model.train_last_n_layers"
            )
        if t.lora is not None:
            self._check_lora()
        self._check_generation_metrics()
        if m.moe is not None:
            self._check_moe()
        self._check_space("tune.space", self.tune.space, {"tune": True})
        shadow = self.serve.shadow
        if self.continual.promotion is not None and (shadow is None or shadow.alias != "challenger"):
            raise ValueError(
                "continual.promotion judges a candidate on its shadow answers: set serve.shadow with alias challenger "
                f"(the alias a cycle moves; got serve.shadow={shadow.model_dump() if shadow else None})"
            )
        if self.continual.promotion is not None and not self.continual.promote:
            raise ValueError("continual.promotion promotes after the live gates, continual.promote=false never: choose one")
        if self.continual.search:
            self._check_space("continual.search.space", self.continual.search.space, {"continual": {"search"}})
        return self

    def _check_generation_metrics(self) -> None:
        t = self.train
        wanted = {
            f"tune.metric={self.tune.metric}": self.tune.metric,
            f"train.checkpoint.score_attribute={t.checkpoint.score_attribute}": t.checkpoint.score_attribute,
        }
        asked = [key for key, metric in wanted.items() if metric in GENERATION_METRICS]
        if asked and not t.eval_generate_rows:
            raise ValueError(
                f"{' and '.join(asked)}: measured only when train.eval_generate_rows > 0 (validation prompts answered each epoch)"
            )
        if not t.eval_generate_rows:
            return
        if self.data is None or self.data.response_column is None or task(self.model.task).reference_metrics is None:
            raise ValueError(
                "train.eval_generate_rows answers validation prompts: it needs instruction data "
                "(data.prompt_column/response_column) for a causal-lm"
            )
        if t.deepspeed.zero_stage == 3:
            raise ValueError(
                "train.eval_generate_rows generates with the whole model on one worker: set train.deepspeed.zero_stage to 2 or less"
            )
        if self.tune.metric in GENERATION_METRICS and self.tune.report_every_steps:
            raise ValueError(f"tune.metric={self.tune.metric} is measured at epoch ends only: remove tune.report_every_steps")
        lower = [
            key
            for key, order in (("tune.mode", self.tune.mode), ("train.checkpoint.score_order", t.checkpoint.score_order))
            if order == "min"
        ]
        asked_lower = [
            key for key in lower if (self.tune.metric if key == "tune.mode" else t.checkpoint.score_attribute) in GENERATION_METRICS
        ]
        if asked_lower:
            raise ValueError(f"{' and '.join(asked_lower)}: min would keep the worst answers by BLEU, chrF or exact match; set max")

    def _check_moe(self) -> None:
        m = self.model
        if m.architecture not in task(m.task).MOE:
            kinds = "; ".join(f"{name}: {', '.join(task(name).MOE)}" for name in with_capability("MOE"))
            raise ValueError(f"model.moe builds models of these tasks and architectures ({kinds}), not {m.task} / {m.architecture}")
        if self.train.deepspeed.zero_stage == 3:
            raise ValueError(
                "model.moe trains under DeepSpeed ZeRO 0-2 (its MoE layers do not take ZeRO-3): set train.deepspeed.zero_stage to 2 or less"
            )
        if self.export.on_register == "always":
            raise ValueError(
                "model.moe models are not exported (their routing does not trace to a fixed ONNX graph): "
                "set export.on_register to auto or never"
            )
        if m.init_from:
            raise ValueError(
                "model.moe builds a new model; a model.init_from version keeps its own experts: remove model.moe to fine-tune it"
            )
        ep, n = m.moe.expert_parallel_size, m.moe.num_experts
        if n % ep or self.scaling.num_workers % ep:
            raise ValueError(
                f"model.moe.expert_parallel_size={ep} must divide model.moe.num_experts={n} "
                f"and scaling.num_workers={self.scaling.num_workers}"
            )
        if m.moe.every_n_layers > m.hf_config.get("n_layer", 12):
            raise ValueError(
                f"model.moe.every_n_layers={m.moe.every_n_layers} is more than the model's {m.hf_config.get('n_layer', 12)} layers"
            )

    def _check_lora(self) -> None:
        m, t = self.model, self.train
        if not task(m.task).LORA:
            adapted = ", ".join(with_capability("LORA"))
            raise ValueError(f"train.lora adapts a {adapted} model; model.task is {m.task}: remove train.lora")
        if not m.init_from:
            raise ValueError("train.lora trains adapters on a pretrained model: set model.init_from (NAME@ALIAS or NAME:VERSION)")
        if m.train_last_n_layers is not None or m.freeze_embeddings:
            raise ValueError(
                "train.lora freezes every weight of the model but its adapters: "
                "remove model.train_last_n_layers and model.freeze_embeddings"
            )
        if t.deepspeed.zero_stage == 3:
            raise ValueError("train.lora runs under DeepSpeed ZeRO 0-2: set train.deepspeed.zero_stage to 2 or less")
        if self.continual is not None and self.continual.new_labels == "grow":
            raise ValueError(
                "train.lora keeps the base's classification head (its label set): continual.new_labels: grow cannot "
                "add classes to it; grow without train.lora"
            )

    def _check_space(self, where: str, space: dict, exclude: dict) -> None:
        """Every searched key must exist and every value of its range must make a valid config."""
        for key, spec in space.items():
            for value in probe_values(spec):
                raw = self.model_dump(mode="json", exclude=exclude)
                try:
                    node, leaf = dotted_parent(raw, key, create=False)
                except KeyError:
                    raise ValueError(f"{where}.{key}: '{key}' is not a config key") from None
                if leaf not in node and not _accepts(key.split(".")[:-1], leaf):
                    raise ValueError(f"{where}.{key}: '{key}' is not a config key")
                node[leaf] = value
                try:
                    JobConfig.model_validate(raw)
                except ValidationError as e:
                    first = e.errors()[0]
                    at = ".".join(str(p) for p in first["loc"])
                    why = first["msg"].removeprefix("Value error, ")
                    raise ValueError(
                        f"{where}.{key}: the value {value!r} makes an invalid config ({at + ': ' if at else ''}{why})"
                    ) from None

    def require_data(self, job: str) -> DataConfig:
        if self.data is None:
            raise ConfigError(f"{job} needs a data section: add data.path (a file, directory or glob)")
        return self.data

    @property
    def served_model(self) -> str:
        """The registry model `lifelong serve` follows."""
        return self.serve.model or self.name

    @property
    def serve_app_name(self) -> str:
        return self.serve.app_name or self.served_model

    @property
    def default_run_name(self) -> str:
        """The stem of a run's name when `run_name` is not given (training adds a digest of the
        run's config and data to it, so that a changed run is a new run)."""
        return f"{self.name}-{task(self.model.task).JOB}"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, resolve_paths: bool = True) -> JobConfig:
    """Read a YAML config, apply `a.b=value` overrides, validate. Raises ConfigError.
    `resolve_paths=False` keeps local paths as written (relative ones stay relative)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    overridden = apply_overrides(raw, overrides, source=str(path))
    config = validate_config(raw, source=str(path), overridden=overridden)
    return absolute_paths(config) if resolve_paths else config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    silently, so an edit further down a config would undo one above it without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while reading a mapping (line {seen[key] + 1})",
                    node.start_mark,
                    f"key '{key}' is given twice: at line {seen[key] + 1} and at line {key_node.start_mark.line + 1}; keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def absolute_paths(config: JobConfig) -> JobConfig:
    """Make local paths absolute (relative to the current directory), since Ray workers run elsewhere."""

    def absolute(value: str) -> str:
        return value if "://" in value else str(Path(value).expanduser().absolute())

    config.storage.root = absolute(config.storage.root)
    if config.data is not None:
        config.data.path = absolute(config.data.path)
        if config.data.image_root:
            config.data.image_root = absolute(config.data.image_root)
    if config.serve.auth.token_file:
        config.serve.auth.token_file = absolute(config.serve.auth.token_file)
    if config.model.tokenizer:
        config.model.tokenizer = absolute(config.model.tokenizer)
    if config.tracking.tensorboard is not None:
        config.tracking.tensorboard.dir = absolute(config.tracking.tensorboard.dir)
    if config.tracking.mlflow is not None and ":" not in config.tracking.mlflow.uri:  # a local directory
        config.tracking.mlflow.uri = absolute(config.tracking.mlflow.uri)
    if config.model.init_from and Path(config.model.init_from).expanduser().exists():
        config.model.init_from = absolute(config.model.init_from)
    return config


def dotted_parent(raw: dict, key: str, *, create: bool = True) -> tuple[dict, str]:
    """The mapping that holds the dotted `key` of a raw config, and the key's last part; the
    sections on the way are made when `create`. A missing section (not `create`) or a value
    where a section belongs raises KeyError with the dotted path to it."""
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {}) if create else node.get(part)
        if not isinstance(child, dict):
            raise KeyError(".".join(parents[: i + 1]))
        node = child
    return node, leaf


def set_dotted(raw: dict, values: dict) -> dict:
    """Set each dotted key of `values` in the raw config (in place; sections made on the way)."""
    for key, value in values.items():
        node, leaf = dotted_parent(raw, key)
        node[leaf] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> set[str]:
    """Apply dotted `key.path=value` overrides in place; values are parsed as YAML."""
    keys = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' (for {source}) is not of the form key.path=value, e.g. train.lr=3e-4")
        try:
            node, leaf = dotted_parent(raw, key)
        except KeyError as e:
            raise ConfigError(f"override '{item}': '{e.args[0]}' is a value, not a section") from None
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[leaf] = value
        keys.add(key)
    return keys


def validate_config(raw: dict, source: str = "<config>", overridden: set[str] = frozenset()) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, overridden) for err in e.errors()]
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _describe(err: dict, overridden: set[str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    origin = " (from a command-line override)" if key in overridden else ""
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{'.'.join(loc[:-1] + guess)}'?" if guess else f"known keys here: {', '.join(known)}"
        return f"{key}{origin}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing; add it to the config or pass {key}=VALUE"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(f"{key}.") or not loc:  # the message names its key already
        return f"{msg}{origin}{shown if loc else ''}"
    return f"{key}{origin}: {msg}{shown}"


def _accepts(parents: list[str], leaf: str) -> bool:
    """Whether the schema has a key `leaf` in the section at `parents` (for keys unset in a dump)."""
    return leaf in _known_keys(parents)


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        # An optional section (`lora: LoraSection | None`) is its section.
        sections = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)
