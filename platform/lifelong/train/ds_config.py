"""DeepSpeed config rules: the typed TrainConfig becomes one DeepSpeed JSON config.

Precision `auto` is decided where the work runs (on the worker), because a cluster's
workers may have other hardware than the driver.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lifelong.config import TrainConfig
from lifelong.errors import ConfigError


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), not by emulation."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 where the hardware has it (CPU or GPU), fp16 on older CUDA GPUs, else fp32."""
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; on CPUs use bf16 or fp32")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def total_optimizer_steps(train: TrainConfig, rows_per_worker: int) -> int:
    batches = math.ceil(rows_per_worker / train.batch_size)
    if train.max_steps_per_epoch is not None:
        batches = min(batches, train.max_steps_per_epoch * train.gradient_accumulation_steps)
    return max(1, batches // train.gradient_accumulation_steps) * train.epochs


def build_deepspeed_config(train: TrainConfig, precision: str, world_size: int, total_steps: int) -> dict:
    warmup = max(1, int(train.warmup_ratio * total_steps)) if train.warmup_ratio > 0 else 1
    if train.schedule == "cosine":
        scheduler = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, warmup + 1),
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
                "warmup_type": "linear",
            },
        }
    elif train.schedule == "linear":
        scheduler = {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(total_steps, warmup + 1),
                "warmup_num_steps": warmup,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": train.lr,
                "warmup_type": "linear",
            },
        }
    else:
        scheduler = {
            "type": "WarmupLR",
            "params": {"warmup_num_steps": warmup, "warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_type": "linear"},
        }
    zero: dict = {"stage": train.deepspeed.zero_stage}
    if train.deepspeed.zero_stage == 3:
        # Lets every rank assemble full weights for the consolidated HF copy.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.deepspeed.offload_optimizer:
        if train.deepspeed.zero_stage == 0:
            raise ConfigError("train.deepspeed.offload_optimizer needs train.deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8, "weight_decay": train.weight_decay},
        },
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # The loop prints its own progress; DeepSpeed's per-step prints would drown it.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, train.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
