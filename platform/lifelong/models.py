"""HF models and tokenizers: build from a config, load from a directory, freeze layers.

Weights are only ever loaded from safetensors (`use_safetensors=True`): nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from lifelong.config import ModelConfig
from lifelong.errors import ConfigError
from lifelong.tasks import task

if TYPE_CHECKING:
    from lifelong.data import TokenizerRef

EOS = "<|endoftext|>"


def load_tokenizer(path: str | Path | TokenizerRef) -> PreTrainedTokenizerFast:
    from lifelong.data import TokenizerRef, with_pad_token

    if isinstance(path, TokenizerRef):
        path = path.local_dir()
    return with_pad_token(AutoTokenizer.from_pretrained(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on the corpus and save it as an HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tok.save_pretrained(str(out_dir))
    return tok


def build_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerFast,
    init_dir: str | Path | None = None,
    labels: list[str] | None = None,
) -> PreTrainedModel:
    """The model.task's model: from `init_dir` weights, else fresh from the config."""
    return task(cfg.task).build(cfg, tokenizer, init_dir, labels)


def fresh_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, **extra):
    try:
        config = AutoConfig.for_model(cfg.architecture, **cfg.hf_config, **extra)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.architecture='{cfg.architecture}' / model.hf_config: {e}") from None
    config.vocab_size = len(tokenizer)
    for key in ("n_positions", "max_position_embeddings"):
        if hasattr(config, key) and key not in cfg.hf_config:
            setattr(config, key, cfg.max_length)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of transformer blocks: the largest ModuleList in the base model."""
    lists = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks to freeze")
    return max(lists, key=len)


def apply_freezing(model: PreTrainedModel, freeze_embeddings: bool, train_last_n_layers: int | None) -> dict:
    """Freeze parameters in place; returns trainable/total parameter counts.

    `train_last_n_layers=N` freezes the whole base model except its last N blocks, so the
    task head (outside the base model) and those blocks train. `freeze_embeddings` freezes
    every embedding table of the base model (tokens and positions).
    """
    if train_last_n_layers is not None:
        blocks = transformer_blocks(model)
        if train_last_n_layers > len(blocks):
            raise ConfigError(f"model.train_last_n_layers={train_last_n_layers} but the model has only {len(blocks)} layers")
        for p in model.base_model.parameters():
            p.requires_grad = False
        for block in list(blocks)[len(blocks) - train_last_n_layers :]:
            for p in block.parameters():
                p.requires_grad = True
    if freeze_embeddings:
        for module in model.base_model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.requires_grad = False
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable}


def hold_frozen_norms(model: nn.Module) -> None:
    """Batch norms whose weights are frozen stay in eval mode while the rest trains: their running
    statistics are part of what was frozen (a ResNet's linear probe leaves its body bit-identical)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def batch_norm_stats_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Running statistics of batch norms in the weights' dtype: DeepSpeed casts parameters to
    bf16/fp16 but not buffers, and batch_norm wants both in one dtype. Saved as fp32 again."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)


def load_for_inference(model_dir: str | Path, task_name: str) -> PreTrainedModel:
    model = task(task_name).auto_class().from_pretrained(str(model_dir), use_safetensors=True, dtype=torch.float32)
    model.eval()
    return model
