"""HF models and tokenizers: build from a config, load from a directory, freeze layers.

Weights are only ever loaded from safetensors (`use_safetensors=True`): nothing is unpickled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
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


ADAPTER_CONFIG = "adapter_config.json"  # a directory holding this holds adapters, not a model


def with_lora(model: PreTrainedModel, lora, family_lora: dict, base_ref: str):
    """The model wrapped with fresh LoRA adapters (PEFT): every weight of `model` frozen, the
    adapters trainable (and a classifier's head, whole: `family_lora`, the task's LoraConfig
    settings). `base_ref` (NAME:VERSION) is recorded in the adapters' config."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        **family_lora,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        # GPT-2's projections are Conv1D (weights stored transposed): the adapters' config must
        # say so, or merging them later transposes their update
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        with quiet_peft():
            adapted = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules the model does not have
        raise ConfigError(f"train.lora: {e}") from None
    adapted.peft_config["default"].base_model_name_or_path = base_ref  # PEFT records the directory it was loaded from
    return adapted


@contextmanager
def quiet_peft():
    """Without PEFT's warnings about what is handled here: one fan_in_fan_out flag for GPT-2's
    Conv1D projections and its Linear head (PEFT sets it per layer), adapters on tied embeddings
    (`untied` before merging)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*fan_in_fan_out", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings", category=UserWarning)
        yield


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).is_file()


def adapter_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())


def adapter_base(model_dir: str | Path) -> str:
    """The NAME:VERSION the adapters in `model_dir` were trained on."""
    return adapter_config(model_dir)["base_model_name_or_path"]


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, task_name: str, labels: list[str] | None = None
) -> None:
    """Save at `out_dir` the model of `base_dir` with the adapters of `adapter_dir` merged into its
    weights (one plain HF model: what export, serving and further training load), and the base's
    tokenizer. A classifier's adapters (`labels`, its label set) carry its head whole: on a base
    without one (a language model, an encoder) the head is built for them, and theirs replaces it."""
    from peft import PeftModel

    family = task(task_name)
    if labels:
        base = family.build(None, family.load_preprocessor(str(base_dir)), init_dir=base_dir, labels=labels).float().eval()
    else:
        base = load_for_inference(base_dir, task_name)
    targets = set(adapter_config(adapter_dir).get("target_modules") or [])
    if targets & embedding_names(base):
        base = untied(base)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    family.load_preprocessor(str(base_dir)).save_pretrained(str(out_dir))


def embedding_names(model: PreTrainedModel) -> set[str]:
    """The module names (last part) of the model's input and output embeddings (none: an image model's)."""
    try:
        tables = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    except NotImplementedError:  # transformers' answer for a model without token embeddings (ResNet)
        return set()
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if any(module is t for t in tables)}


def untied(model: PreTrainedModel) -> PreTrainedModel:
    """The output embeddings given a weight of their own where they share the input embeddings'
    (GPT-2): adapters on both add different updates, which one shared weight cannot hold merged."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is not None and outputs.weight is inputs.weight:
        outputs.weight = nn.Parameter(inputs.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def load_for_inference(model_dir: str | Path, task_name: str) -> PreTrainedModel:
    model = task(task_name).auto_class().from_pretrained(str(model_dir), use_safetensors=True, dtype=torch.float32)
    model.eval()
    return model
