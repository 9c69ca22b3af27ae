"""Mixture of Experts for GPT-2 (`model.moe`): the MLP of chosen blocks replaced by DeepSpeed MoE
layers (a learned top-k gate over `num_experts` copies of the block's MLP).

The model is an HF model of its own type (`lifelong-gpt2-moe`, registered with the Auto classes
when this module is imported), so it saves, loads, generates (KV cache) and registers as any
GPT-2 does. Training adds the gates' load-balancing loss (`aux_loss_weight` x the mean over MoE
layers) to the language-model loss the loop logs; evaluation and perplexity read the language
model's loss alone. With `expert_parallel_size` 1 every worker holds every expert (their
gradients averaged across workers as DeepSpeed's expert data parallelism does) and the layers
run without a process group (serving, evaluate); more shards the experts across workers, which
needs a backend with all-to-all (NCCL).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

MODEL_TYPE = "lifelong-gpt2-moe"


class GPT2MoEConfig(GPT2Config):
    model_type = MODEL_TYPE

    def __init__(
        self,
        moe_num_experts: int = 4,
        moe_top_k: int = 1,
        moe_every_n_layers: int = 1,
        moe_capacity_factor: float = 1.25,
        moe_aux_loss_weight: float = 0.01,
        moe_expert_parallel_size: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_every_n_layers = moe_every_n_layers
        self.moe_capacity_factor = moe_capacity_factor
        self.moe_aux_loss_weight = moe_aux_loss_weight
        self.moe_expert_parallel_size = moe_expert_parallel_size


class Expert(GPT2MLP):
    """One expert: the block's MLP, on the slice of tokens routed to it (DeepSpeed hands each
    expert a strided view after the all-to-all; GPT-2's Conv1D wants contiguous input)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.contiguous())


class MoEMLP(nn.Module):
    """A block's MLP as a DeepSpeed MoE layer; keeps the gate's auxiliary loss of its last forward."""

    def __init__(self, config: GPT2MoEConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            config.n_embd,
            Expert(4 * config.n_embd if config.n_inner is None else config.n_inner, config),
            num_experts=config.moe_num_experts,
            ep_size=config.moe_expert_parallel_size,
            k=config.moe_top_k,
            capacity_factor=config.moe_capacity_factor,
            # Answers never drop tokens: at most every token to one expert, whatever the routing
            # (so a prompt scores the same token by token, with the KV cache, as at once).
            eval_capacity_factor=float(config.moe_num_experts),
            min_capacity=1,
            top2_2nd_expert_sampling=False,  # the second expert by the gate, not by noise: answers repeat
        )
        self.l_aux = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, _ = self.moe(hidden_states)
        return out.to(hidden_states.dtype)


class GPT2MoEForCausalLM(GPT2LMHeadModel):
    config_class = GPT2MoEConfig

    def __init__(self, config: GPT2MoEConfig):
        super().__init__(config)
        for i, block in enumerate(self.transformer.h):
            if (i + 1) % config.moe_every_n_layers == 0:
                block.mlp = MoEMLP(config)
        self.post_init()

    def moe_layers(self) -> list[MoEMLP]:
        return [m for m in self.modules() if isinstance(m, MoEMLP)]

    def aux_loss(self) -> torch.Tensor:
        """The gates' load-balancing loss of the last forward, weighted (model.moe.aux_loss_weight)."""
        return self.config.moe_aux_loss_weight * torch.stack([m.l_aux.float() for m in self.moe_layers()]).mean()

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training and out.loss is not None:
            out.loss = out.loss + self.aux_loss().to(out.loss.dtype)
        return out


def moe_config(base: GPT2Config, moe) -> GPT2MoEConfig:
    """The MoE model's config: the GPT-2 config with `model.moe`'s settings."""
    return GPT2MoEConfig(
        **{k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")},
        moe_num_experts=moe.num_experts,
        moe_top_k=moe.top_k,
        moe_every_n_layers=moe.every_n_layers,
        moe_capacity_factor=moe.capacity_factor,
        moe_aux_loss_weight=moe.aux_loss_weight,
        moe_expert_parallel_size=moe.expert_parallel_size,
    )


def is_moe_dir(model_dir) -> bool:
    """Whether an HF directory holds such a model (by its config's model_type)."""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, MoEMLP) for m in model.modules())


def optimizer_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters as DeepSpeed's optimizer wants them with MoE layers: the experts'
    apart (averaged over the expert data-parallel group, not every worker). Their marks are set
    here, since loading weights (`from_pretrained`) makes new parameters without them."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for layer in (m for m in model.modules() if isinstance(m, MoEMLP)):
        for param in layer.moe.deepspeed_moe.experts.parameters():
            param.allreduce = False
            param.group_name = layer.moe.expert_group_name
    trainable = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer([{"params": trainable, "name": "lifelong"}])


EXPERT_KEY = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


def whole_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a worker's full weights) with every expert of every layer under its own index: with
    the experts split over `expert_parallel_size` workers, a worker holds only its own (local
    indices 0..n-1); they are gathered over its expert-parallel group (a collective: every worker
    calls it) and renumbered, expert e living on the group's rank e // n."""
    ep = getattr(model.config, "moe_expert_parallel_size", 1)
    if ep == 1:
        return state
    import torch.distributed as dist
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{ep}")
    local = model.config.moe_num_experts // ep
    mine = {k: v for k, v in state.items() if EXPERT_KEY.match(k)}
    gathered = [None] * ep
    dist.all_gather_object(gathered, mine, group=group)
    whole = {k: v for k, v in state.items() if not EXPERT_KEY.match(k)}
    for rank, part in enumerate(gathered):
        for key, value in part.items():
            head, index, tail = EXPERT_KEY.match(key).groups()
            whole[f"{head}{rank * local + int(index)}{tail}"] = value
    return whole


@contextmanager
def saved_whole(model: nn.Module):
    """Save the model's config as one process holds it (every expert: expert_parallel_size 1),
    for weights from `whole_experts`; what loads it later needs no process group."""
    ep = getattr(model.config, "moe_expert_parallel_size", None)
    if ep is not None:
        model.config.moe_expert_parallel_size = 1
    try:
        yield
    finally:
        if ep is not None:
            model.config.moe_expert_parallel_size = ep


AutoConfig.register(MODEL_TYPE, GPT2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2MoEConfig, GPT2MoEForCausalLM, exist_ok=True)
