"""The training loop: one DeepSpeed engine per worker, written out in order.

Everything arrives through `loop_config` (built by the driver): the validated job config,
where the tokenizer and the starting weights are, and the step plan. Where it runs is a
`Session`: a Ray Train worker (`train_loop_per_worker`, any number of workers), or a one-worker
sweep trial that runs the loop in its own Tune process (`train_in_trial`: no Train controller,
worker group or data-split coordinators to start, and Tune reuses the process between trials).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import ray.tune
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from lifelong.config import JobConfig
from lifelong.data import REPLAYED
from lifelong.models import apply_freezing, batch_norm_stats_in, build_model, hold_frozen_norms, with_lora
from lifelong.moe import has_moe, optimizer_groups, saved_whole, whole_experts
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.tasks import task as family
from lifelong.tracking import RunTracker
from lifelong.train import ops
from lifelong.train.ds_config import build_deepspeed_config, resolve_precision

DS_TAG = "state"  # one DeepSpeed tag per checkpoint directory


class TrainSession:
    """The loop inside a Ray Train worker: its rank, its dataset shards, Train's checkpoints."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, directory: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class OneProcessSession:
    """The loop as the only worker of its run, in a process that outlives it (a sweep trial's,
    a warm trainer's): the whole (materialized) datasets, and a one-process gloo (nccl on a GPU)
    group for DeepSpeed, made once and kept for the runs that follow in the same process."""

    rank, world = 0, 1

    def __init__(self, datasets: dict, gpu: bool):
        self.datasets = datasets
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        if not dist.is_initialized():
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            dist.init_process_group("nccl" if gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)

    def dataset(self, name: str):
        return self.datasets[name]


class TrialSession(OneProcessSession):
    """A one-worker sweep trial: checkpoints and reports through Tune."""

    def checkpoint(self):
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, directory: str | None) -> None:
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory) if directory else None)


class ShardCache:
    """A worker's training shard, kept after its first whole pass when it is small
    (`cache_train_shard`, decided on the driver): later epochs draw their batches from it in a
    fresh seeded order each, instead of pulling every batch through Ray Data again (on a small
    machine that costs a small model more than its forward and backward). The worker keeps the
    rows of its first pass (a fixed partition, shuffled within itself every epoch)."""

    def __init__(self):
        self.full: dict | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.full.values()))) if self.full else 0

    def collect(self, batches):
        """Yield `batches`; once they have all been yielded, keep them (a pass cut short keeps nothing)."""
        parts = []
        for batch in batches:
            parts.append(batch)
            yield batch
        self.full = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None

    def epoch(self, batch_size: int, seed: int):
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(seed))
        for idx in order.split(batch_size):
            yield {k: v[idx.to(v.device)] for k, v in self.full.items()}


def train_loop_per_worker(loop_config: dict) -> None:
    run_loop(loop_config, TrainSession())


def train_in_trial(loop_config: dict, datasets: dict, gpu: bool) -> None:
    run_loop(loop_config, TrialSession(datasets, gpu))


def run_loop(loop_config: dict, session) -> None:
    entered = time.perf_counter()
    ops.use_prebuilt()  # before DeepSpeed loads (or would compile) its CPU ops
    config = JobConfig.model_validate(loop_config["config"])
    train_cfg, task = config.train, family(config.model.task)
    rank, world, device = session.rank, session.world, session.device
    precision = resolve_precision(train_cfg.precision, device)
    torch.manual_seed(train_cfg.seed)
    # Every worker says where it runs (one line each): on a cluster, the job's log shows the spread.
    sys.stdout.write(f"[lifelong] worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]} ({device})\n")
    sys.stdout.flush()

    # --- model -----------------------------------------------------------------------------
    tokenizer = task.load_preprocessor(loop_config["tokenizer"])  # a TokenizerRef, resolved on this worker's node
    init_dir = None
    if config.model.init_from:
        init_dir = Registry(Storage(config.storage.root)).resolve(config.model.init_from).local_dir
    model = build_model(config.model, tokenizer, init_dir=init_dir, labels=config.data.labels)
    if train_cfg.lora is not None:  # adapters on init_from (pinned NAME:VERSION); only they train and are saved
        model = with_lora(model, train_cfg.lora, task.LORA, config.model.init_from)
    sizes = apply_freezing(model, config.model.freeze_embeddings, config.model.train_last_n_layers)
    ds_config = build_deepspeed_config(train_cfg, precision, world, loop_config["total_steps"])
    # DeepSpeed casts the module to bf16/fp16 and keeps fp32 masters only of what it trains:
    # frozen weights are saved from this copy, so they come out exactly as they went in.
    frozen_fp32 = frozen_weights(model) if precision != "fp32" and train_cfg.lora is None else {}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        # MoE layers' experts go in optimizer groups of their own (expert data parallelism)
        model_parameters=optimizer_groups(model) if has_moe(model) else [p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )

    dtype = next(engine.module.parameters()).dtype  # floating inputs (pixels) go in at the weights' precision
    batch_norm_stats_in(engine.module, dtype)
    # --- resume: a run re-started under the same name continues after its last epoch -------
    start_epoch, history = 1, []
    checkpoint = session.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag=DS_TAG)
            state = json.loads((Path(ckpt_dir) / "state.json").read_text())
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(rank, f"resumed from epoch {state['epoch']} (step {engine.global_steps})")
    else:
        log(
            rank,
            f"{sizes['trainable_params']:,} of {sizes['total_params']:,} parameters trainable; "
            f"{world} worker(s), ZeRO-{train_cfg.deepspeed.zero_stage}, {precision}, {device}",
        )

    train_shard = session.dataset("train")
    val_shard = session.dataset("validation")
    steps_per_epoch = loop_config["total_steps"] // train_cfg.epochs
    report_every = loop_config.get("report_every_steps")  # a sweep's trials: also inside epochs, for ASHA
    n_labels = len(config.data.labels or [])
    # A continual cycle's distillation (continual.distill_weight): the champion it starts from,
    # frozen, scores the replayed rows of each batch; loaded when the first such batch comes.
    distill = config.continual.distill_weight if init_dir is not None and task.CONTINUAL else 0.0
    teacher = None
    cache = ShardCache() if loop_config.get("cache_train_shard") else None
    row_weights = loop_config.get("row_weights")  # a continual cycle's, for its new and its replayed rows
    replay_samples = loop_config.get("replay_samples") or 1  # a continual cycle's: one per epoch when > 1
    reference = loop_config.get("reference_rows")  # validation prompts to answer each epoch
    moe = has_moe(engine.module)
    tracker = RunTracker(config, rank)  # TensorBoard, when the config asks (lifelong.tracking)
    setup_seconds = time.perf_counter() - entered  # model load + DeepSpeed init (+ resume)
    for epoch in range(start_epoch, train_cfg.epochs + 1):
        # --- train one epoch ---------------------------------------------------------------
        engine.train()
        hold_frozen_norms(engine.module)
        started, units, loss_sum, micro_steps = time.perf_counter(), 0, 0.0, 0
        if cache is not None and cache.rows:
            batches = cache.epoch(train_cfg.batch_size, seed=train_cfg.seed + epoch + 7919 * rank)
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=train_cfg.batch_size,
                device=device,
                dtypes=task.batch_dtypes(),
                local_shuffle_buffer_size=train_cfg.batch_size * 8,
                local_shuffle_seed=train_cfg.seed + epoch,
            )
            if cache is not None:
                batches = cache.collect(batches)
        if replay_samples > 1:
            sample = (epoch - 1) % replay_samples + 1
            batches = epoch_sample(batches, sample, train_cfg.batch_size, steps_per_epoch * train_cfg.gradient_accumulation_steps)
        for batch in batches:
            inputs = task.model_inputs(batch, dtype, augment=config.data)
            out = engine(**inputs)
            if row_weights is None:
                loss = out.loss
            else:  # a continual cycle's weighted rows (an MoE model's gate loss added again)
                loss = weighted_loss(out.logits, batch, row_weights)
                loss = loss + engine.module.aux_loss().to(loss.dtype) if moe else loss
            if distill and REPLAYED in batch and bool(batch[REPLAYED].any()):
                if teacher is None:
                    teacher = build_model(config.model, tokenizer, init_dir=init_dir, labels=config.data.labels).to(device).eval()
                loss = loss + distill * distillation_loss(teacher, inputs, batch[REPLAYED].bool(), out.logits)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and schedule at accumulation boundaries
            micro_steps += 1
            units += task.batch_units(batch)
            loss_sum += float(loss.detach().float())
            if (
                engine.is_gradient_accumulation_boundary()
                and (micro_steps // train_cfg.gradient_accumulation_steps) % train_cfg.log_every_steps == 0
            ):
                log(
                    rank,
                    f"epoch {epoch}/{train_cfg.epochs} step {micro_steps // train_cfg.gradient_accumulation_steps}/{steps_per_epoch} "
                    f"loss {loss_sum / micro_steps:.4f} lr {engine.get_lr()[0]:.2e}",
                )
                tracker.step(engine.global_steps, loss_sum / micro_steps, engine.get_lr()[0])
            if train_cfg.max_steps_per_epoch and micro_steps >= train_cfg.max_steps_per_epoch * train_cfg.gradient_accumulation_steps:
                break
            step = micro_steps // train_cfg.gradient_accumulation_steps
            if report_every and engine.is_gradient_accumulation_boundary() and step % report_every == 0 and step < steps_per_epoch:
                # Inside the epoch (its end reports below, with the checkpoint): validate and
                # report without a checkpoint, so that ASHA can stop a poor trial before it ends.
                totals = all_reduce_sum(device, [loss_sum, micro_steps])
                val_metrics = evaluate_shard(engine, val_shard, task, train_cfg.batch_size, device, n_labels, dtype)
                partial = {
                    "epoch": epoch - 1,  # epochs completed
                    "progress": epoch - 1 + step / steps_per_epoch,  # epochs trained, fractional
                    "train_loss": totals[0] / max(totals[1], 1),
                    "global_step": engine.global_steps,
                    **val_metrics,
                }
                log(rank, f"epoch {epoch}/{train_cfg.epochs} step {step}/{steps_per_epoch}: " + _shown(val_metrics))
                session.report(partial, None)
        elapsed = time.perf_counter() - started
        totals = all_reduce_sum(device, [units, loss_sum, micro_steps])
        train_metrics = {
            "epoch": epoch,
            **({"progress": float(epoch)} if report_every else {}),  # ASHA's clock when it reports inside epochs
            "train_loss": totals[1] / max(totals[2], 1),
            f"train_{task.UNIT}_per_s": totals[0] / elapsed,
            "epoch_seconds": elapsed,
            "global_step": engine.global_steps,
        }

        # --- validate ----------------------------------------------------------------------
        started = time.perf_counter()
        val_metrics = evaluate_shard(engine, val_shard, task, train_cfg.batch_size, device, n_labels, dtype)
        if reference and rank == 0:  # answers to validation prompts (train.eval_generate_rows); the others wait at the checkpoint
            engine.eval()
            scored = task.reference_metrics(
                engine.module, tokenizer, reference["prompts"], reference["references"], config.serve.max_new_tokens
            )
            val_metrics.update({f"val_{k}": v for k, v in scored.items() if k != "generated"})
            engine.train()
        timing = {"val_seconds": time.perf_counter() - started, "setup_seconds": setup_seconds}
        metrics = {**train_metrics, **val_metrics, **timing}
        # Both losses are all-reduced, so every rank stops here together.
        if not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics.get("val_loss", 0.0))):
            raise FloatingPointError(
                f"the loss is not finite at epoch {epoch} (train {metrics['train_loss']}, validation "
                f"{metrics.get('val_loss')}): lower train.lr or check the data"
            )
        history.append(metrics)
        tracker.epoch(engine.global_steps, metrics)
        log(
            rank,
            "epoch {epoch} done: ".format(epoch=epoch)
            + _shown({k: v for k, v in metrics.items() if k not in ("epoch", "progress", *timing)}),
        )

        # --- checkpoint: DeepSpeed shards for exact resume + consolidated HF copy ------------
        with tempfile.TemporaryDirectory() as tmp:
            # Every rank writes its own optimizer/parameter shards; Ray merges the directories.
            engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag=DS_TAG)
            # Gathering full weights is a collective under ZeRO-3: every rank takes part.
            state_dict = consolidated_state_dict(engine, frozen_fp32, trained_only=train_cfg.lora is not None)
            if rank == 0:
                # Only rank 0 writes the downstream copy, so the merged checkpoint has one.
                hf_dir = Path(tmp) / "hf"
                if train_cfg.lora is not None:  # the adapters alone; the base's tokenizer stays the base's
                    engine.module.save_pretrained(str(hf_dir), state_dict=state_dict, save_embedding_layers=False)
                    (hf_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
                else:
                    with saved_whole(engine.module):  # an MoE model's experts, all of them
                        engine.module.save_pretrained(str(hf_dir), state_dict=state_dict)
                    mark_fp32(hf_dir / "config.json")
                    tokenizer.save_pretrained(str(hf_dir))
                (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch, "history": history, "precision": precision}))
            session.report(metrics, tmp)
    tracker.close()


def _shown(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def frozen_weights(model) -> dict[str, torch.Tensor]:
    """fp32 copies of what does not train: frozen parameters, and the running statistics of batch
    norms held in eval mode (`hold_frozen_norms`), which are cast with the weights."""
    frozen = {n: p.detach().float().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            for name, buf in module.named_buffers(recurse=False):
                frozen[f"{prefix}.{name}"] = buf.detach().clone()
    return frozen


def consolidated_state_dict(
    engine, frozen_fp32: dict[str, torch.Tensor] | None = None, trained_only: bool = False
) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (collective): optimizer masters where they exist, the
    pre-cast copy of frozen weights (`frozen_fp32`) where one was kept. `trained_only`: the
    trained parameters alone (LoRA adapters; no buffers)."""
    module = engine.module
    if trained_only:
        return {name: _master(p).float().cpu() for name, p in module.named_parameters() if p.requires_grad}
    keep = set(module.state_dict().keys())
    state = {}
    for name, param in module.named_parameters():
        if frozen_fp32 and name in frozen_fp32:
            state[name] = frozen_fp32[name]
            continue
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            # Frozen or non-ZeRO parameters: the module's own copy (gathered under ZeRO-3).
            gather = deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else nullcontext()
            with gather:
                full = param.detach().clone()
        state[name] = full.float().cpu()
    for name, buf in module.named_buffers():
        if frozen_fp32 and name in frozen_fp32:
            state[name] = frozen_fp32[name]
        elif name in keep:
            state[name] = buf.detach().cpu().float() if buf.is_floating_point() else buf.detach().cpu()
    return whole_experts(module, state) if has_moe(module) else state


def _master(param) -> torch.Tensor:
    """A trained parameter's fp32 optimizer master (ZeRO 1-2), else the parameter itself."""
    full = safe_get_full_fp32_param(param)
    return full if full is not None else param.detach()


def mark_fp32(config_json: Path) -> None:
    # save_pretrained records the live module's dtype (bf16 under bf16 training), but the
    # weights we saved are the fp32 masters: loaders must not round them down again.
    config = json.loads(config_json.read_text())
    config["dtype"] = "float32"
    config_json.write_text(json.dumps(config, indent=2))


def epoch_sample(batches, sample: int, batch_size: int, count: int):
    """The rows of `batches` one epoch of a cycle trains on: the new rows (replayed 0) and those of
    its own replay sample (replayed == `sample`), in `count` batches of `batch_size` (the last may
    be short). Every worker yields exactly `count`, so their collectives stay in step although
    their shards hold a sample's rows in slightly different numbers: a worker with more drops the
    rest, one with fewer trains its first rows again. `batches` is drained whole (a shard cache
    keeps only a pass it saw to the end)."""
    pending, held, made, first = [], 0, 0, None
    for batch in batches:
        if made == count:
            continue  # read on to the end, holding nothing
        keep = (batch[REPLAYED] == 0) | (batch[REPLAYED] == sample)
        pending.append({k: v[keep] for k, v in batch.items()})
        held += int(keep.sum())
        while held >= batch_size and made < count:
            rows = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            out = {k: v[:batch_size] for k, v in rows.items()}
            pending, held = [{k: v[batch_size:] for k, v in rows.items()}], held - batch_size
            first = first or out
            made += 1
            yield out
    if held and made < count:
        out = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        first = first or out
        made += 1
        yield out
    while first is not None and made < count:
        made += 1
        yield first


def weighted_loss(logits: torch.Tensor, batch: dict, weights: dict[str, float]) -> torch.Tensor:
    """Cross-entropy with each row weighed as new or replayed (continual.replay_weighting); the
    weights have mean 1 over the cycle's rows, so a batch's mean stays on the unweighted scale.
    A language model's row (a block of tokens) counts its mean next-token loss."""
    if logits.dim() == 3:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        real = batch["attention_mask"][:, 1:].to(ce.dtype)
        per_row = (ce * real).sum(1) / real.sum(1).clamp(min=1)
    else:
        per_row = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
    w = torch.where(batch[REPLAYED].bool(), weights["replayed"], weights["new"]).to(per_row.dtype)
    return (per_row * w).mean()


def distillation_loss(teacher, inputs: dict, replayed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the candidate's logits and the frozen champion's on the
    batch's replayed rows (logit matching, as dark experience replay does)."""
    with torch.no_grad():
        rows = {k: v[replayed].float() if v.is_floating_point() else v[replayed] for k, v in inputs.items() if k != "labels"}
        target = teacher(**rows).logits
    return torch.nn.functional.mse_loss(logits[replayed].float(), target.float())


@torch.no_grad()
def evaluate_shard(engine, shard, task, batch_size: int, device, num_labels: int, dtype=torch.float32) -> dict[str, float]:
    """Validation metrics over all workers' shards (loss, and what the task measures: accuracy
    and F1, or perplexity)."""
    engine.eval()
    loss_sum, count, preds, labels, probs = 0.0, 0, [], [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, dtypes=task.batch_dtypes()):
        out = engine(**task.model_inputs(batch, dtype))
        n = task.loss_weight(batch)
        predicted = task.predictions(out.logits)
        if predicted is not None:
            preds.extend(predicted)
            labels.extend(batch["labels"].tolist())
            probs.extend(task.probabilities(out.logits))
        loss_sum += float(out.loss.float()) * n
        count += n
    engine.train()
    loss_sum, count = all_reduce_sum(device, [loss_sum, count])
    loss = loss_sum / max(count, 1)
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [(preds, labels, probs)]
    if dist.is_initialized():
        dist.all_gather_object(gathered, (preds, labels, probs))
    all_preds = [p for part in gathered for p in part[0]]
    all_labels = [y for part in gathered for y in part[1]]
    all_probs = [p for part in gathered for p in part[2]] if all_preds else None
    return {f"val_{k}": v for k, v in task.metrics(loss, all_labels, all_preds, num_labels, all_probs).items()}


def all_reduce_sum(device, values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def log(rank: int, message: str) -> None:
    # Rank 0 speaks for the group; Ray forwards worker stdout to the driver. (Train's patched
    # print() would also copy the line to its logger, and the driver would show it twice.)
    if rank == 0:
        sys.stdout.write(f"[lifelong] {message}\n")
        sys.stdout.flush()
