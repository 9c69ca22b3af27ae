"""Mixture of Experts (model.moe): GPT-2 blocks whose MLP is a DeepSpeed MoE layer train with 2
workers, resume after a kill, register and generate; the gates' load-balancing loss is in the
training loss; an MoE version is refused ONNX export with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, killed_after_first_checkpoint, make_config
from lifelong.errors import ConfigError
from lifelong.registry import Registry
from lifelong.storage import Storage


def test_the_training_loss_adds_the_gates_load_balancing_loss_and_evaluation_reads_the_lm_loss_alone(tiny_tokenizer):
    from lifelong.models import build_model, load_tokenizer
    from lifelong.moe import MoEMLP

    config = make_config("gpt2/tiny_moe_pretrain.yaml", "model.moe.aux_loss_weight=0.5", "model.moe.every_n_layers=2")
    torch.manual_seed(0)
    model = build_model(config.model, load_tokenizer(tiny_tokenizer))
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(layers) == 1 and isinstance(model.transformer.h[1].mlp, MoEMLP)  # every second block of 2
    assert len(layers[0].moe.deepspeed_moe.experts.deepspeed_experts) == 4
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    torch.manual_seed(2)
    out = model(input_ids=ids, labels=ids)
    torch.manual_seed(2)  # the same dropout draws
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(plain.item() + 0.5 * layers[0].l_aux.item(), rel=1e-5)
    assert layers[0].l_aux.item() > 0
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-5)


def test_moe_settings_that_cannot_work_are_refused_naming_the_key():
    with pytest.raises(
        ConfigError,
        match=r"model.moe builds models of these tasks and architectures \(causal-lm: gpt2\), not sequence-classification / gpt2",
    ):
        make_config("gpt2/tiny_finetune.yaml", "model.moe={num_experts: 4}", "model.init_from=null", "model.tokenizer=/tmp")
    with pytest.raises(ConfigError, match="a model.init_from version keeps its own experts"):
        make_config("gpt2/tiny_moe_pretrain.yaml", "model.init_from=tiny-gpt2-moe@champion")
    with pytest.raises(ConfigError, match="expert_parallel_size=2 must divide model.moe.num_experts=3"):
        make_config("gpt2/tiny_moe_pretrain.yaml", "model.moe.expert_parallel_size=2", "model.moe.num_experts=3")
    with pytest.raises(ConfigError, match="top_k"):
        make_config("gpt2/tiny_moe_pretrain.yaml", "model.moe.top_k=3")
    with pytest.raises(ConfigError, match="ZeRO 0-2"):
        make_config("gpt2/tiny_moe_pretrain.yaml", "train.deepspeed.zero_stage=3")
    with pytest.raises(ConfigError, match="set export.on_register to auto or never"):
        make_config("gpt2/tiny_moe_pretrain.yaml", "export.on_register=always")


def test_lora_on_an_moe_version_is_refused_before_its_data_is_read(tiny_tokenizer, tmp_path):
    import shutil

    from lifelong.models import build_model, load_tokenizer
    from lifelong.train.driver import prepare_run

    torch.manual_seed(0)
    model = build_model(make_config("gpt2/tiny_moe_pretrain.yaml").model, load_tokenizer(tiny_tokenizer))
    model.save_pretrained(tmp_path / "hf")
    for f in Path(tiny_tokenizer).iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    registry = Registry(Storage(str(tmp_path / "store")))
    version = registry.register_version("moe", tmp_path / "hf", {"task": "causal-lm", "config": {}})
    config = make_config(
        "gpt2/tiny_lora.yaml",
        f"storage.root={tmp_path / 'store'}",
        f"model.init_from=moe:{version}",
        f"data.path={tmp_path / 'none.jsonl'}",
    )
    with pytest.raises(ConfigError, match=r"train.lora on 'moe:1', a Mixture-of-Experts model, is not supported"):
        prepare_run(config)


@pytest.mark.slow
def test_an_moe_gpt2_trains_on_two_workers_resumes_after_a_kill_registers_and_generates(ray_session, demo_data, tmp_path):
    from lifelong.config import ExportSection
    from lifelong.errors import LifelongError
    from lifelong.export import export_version
    from lifelong.inference import Generator
    from lifelong.train.driver import run_training

    overrides = [
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "run_name=moe-resume",
        "train.epochs=3",
        "train.max_steps_per_epoch=25",
    ]
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "lifelong.cli", "pretrain", f"{CONFIGS}/gpt2/tiny_moe_pretrain.yaml", *overrides, "--address", address]
    first = killed_after_first_checkpoint(command, tmp_path / "runs" / "moe-resume")  # the driver dies mid-run
    assert first and max(r["metrics"]["epoch"] for r in first) < 3, "killed too late or never checkpointed"

    outcome = run_training(make_config("gpt2/tiny_moe_pretrain.yaml", *overrides))
    registry = Registry(Storage(str(tmp_path)))
    card = registry.card("tiny-gpt2-moe", outcome.version)
    history = card.run.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0] == min(first, key=lambda r: r["metrics"]["epoch"])["metrics"] | {
        k: history[0][k] for k in history[0] if k not in first[0]["metrics"]
    }  # epoch 1 is the killed run's, carried over
    assert history[-1]["global_step"] == 3 * history[0]["global_step"]  # resumed where it stopped, not from step 0
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_loss"] < history[0]["val_loss"]

    # The version: every block's MLP is 4 experts behind a gate, and they learned different things.
    model_dir = registry.resolve(outcome.ref).local_dir
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "lifelong-gpt2-moe"
    weights = load_file(str(model_dir / "model.safetensors"))
    experts = [weights[f"transformer.h.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{i}.c_fc.weight"] for i in range(4)]
    assert "transformer.h.1.mlp.moe.deepspeed_moe.gate.wg.weight" in weights
    assert not any(torch.equal(experts[0], e) for e in experts[1:])
    # It generates, the same with the KV cache as without.
    generator = Generator(model_dir, 64)
    cached = generator.generate("The for statement", 8)
    assert cached["tokens"] == 8 and cached["text"] == generator.generate("The for statement", 8, use_cache=False)["text"]
    with pytest.raises(LifelongError, match="Mixture-of-Experts model .* does not export to a fixed ONNX graph"):
        export_version(registry, "tiny-gpt2-moe", outcome.version, ExportSection(), None, ("onnx",))


@pytest.mark.slow
def test_experts_split_over_two_workers_train_and_save_as_one_model_that_scores_as_they_did(ray_session, demo_data, tmp_path):
    """expert_parallel_size 2: each of the 2 workers holds 2 of the 4 experts of every block and
    tokens travel between them (all-to-all, which gloo does on CPUs). The version holds all 4
    under their global numbers: loaded whole in one process (no group), it scores the run's own
    validation blocks as the two workers did together (fp32, so to float accuracy)."""
    from lifelong.tasks.causal_lm import score
    from lifelong.train.driver import prepare_data, run_training

    config = make_config(
        "gpt2/tiny_moe_pretrain.yaml",
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "model.moe.expert_parallel_size=2",
        "train.precision=fp32",
        "train.epochs=1",
        "train.max_steps_per_epoch=15",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(tmp_path)))
    card = registry.card("tiny-gpt2-moe", outcome.version)
    model_dir = registry.resolve(outcome.ref).local_dir
    weights = load_file(str(model_dir / "model.safetensors"))
    for block in (0, 1):
        experts = [weights[f"transformer.h.{block}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{i}.c_fc.weight"] for i in range(4)]
        assert all(not torch.equal(a, b) for i, a in enumerate(experts) for b in experts[i + 1 :])
    assert json.loads((model_dir / "config.json").read_text())["moe_expert_parallel_size"] == 1
    # Each expert under the number DeepSpeed's own checkpoint gives it (one file per expert, saved
    # by the worker that holds it, keys named by global number): exactly those weights.
    files = sorted((Path(card.run.checkpoint) / "deepspeed" / "state").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 2 * 4
    for f in files:
        saved = torch.load(f, map_location="cpu", weights_only=False)
        assert saved and all(torch.equal(v.float(), weights[k]) for k, v in saved.items()), f.name

    from lifelong.models import load_for_inference

    model = load_for_inference(model_dir, "causal-lm")
    val = prepare_data(config, Storage(str(tmp_path)), registry).val_ds
    loss_sum = count = 0.0
    with torch.no_grad():
        for batch in val.iter_batches(batch_size=32, batch_format="numpy"):
            scored = score(model, batch)
            loss_sum, count = loss_sum + scored["loss_sum"].sum(), count + scored["count"].sum()
    assert loss_sum / count == pytest.approx(card.run.history[-1]["val_loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="expert parallelism across workers needs 2 CUDA GPUs (NCCL all-to-all)")
def test_experts_are_split_across_two_gpu_workers(ray_session, demo_data, tmp_path):
    from lifelong.train.driver import run_training

    outcome = run_training(
        make_config(
            "gpt2/tiny_moe_pretrain.yaml",
            f"data.path={demo_data / 'corpus.jsonl'}",
            f"storage.root={tmp_path}",
            "model.moe.expert_parallel_size=2",
            "scaling.use_gpu=true",
            "train.epochs=1",
        )
    )
    weights = load_file(str(Registry(Storage(str(tmp_path))).resolve(outcome.ref).local_dir / "model.safetensors"))
    assert sum(".deepspeed_experts." in k and k.endswith("c_fc.weight") for k in weights) == 2 * 4  # every expert saved once
    assert Path(outcome.path).exists()
