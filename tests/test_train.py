"""Training on Ray Train + DeepSpeed with real workers: pretrain, fine-tune, ZeRO stages, resume."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import free_cpus_when_settled, killed_after_first_checkpoint, make_config, read_tensorboard, what_holds_cpus
from lifelong.errors import ConfigError, LifelongError
from lifelong.registry import Registry
from lifelong.storage import Storage
from lifelong.train.driver import run_training

pytestmark = pytest.mark.slow


def test_pretrain_loss_falls_and_registered_version_generates(pretrained):
    outcome = pretrained["outcome"]
    registry = Registry(Storage(str(pretrained["root"])))
    card = registry.card("tiny-gpt2", outcome.version)
    history = card.run.history
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["val_loss"] < history[0]["val_loss"]
    assert card.task == "causal-lm" and card.parent is None
    assert card.data["files"][0]["path"].endswith("corpus.jsonl") and card.data["files"][0]["sha256"]
    assert card.config["train"]["deepspeed"]["zero_stage"] == 2

    model_dir = registry.resolve(f"tiny-gpt2:{outcome.version}").local_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("The import statement", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert tok.decode(out[0, prompt["input_ids"].shape[1] :]).strip()


def test_finetune_from_registry_learns_and_frozen_embeddings_stay(pretrained, demo_data, tmp_path, mlflow_server):
    root = pretrained["root"]
    parent = f"tiny-gpt2:{pretrained['outcome'].version}"
    config = make_config(
        "gpt2/tiny_finetune.yaml",
        f"data.path={demo_data / 'topics.jsonl'}",
        f"storage.root={root}",
        f"model.init_from={parent}",
        "model.freeze_embeddings=true",
        "train.epochs=4",
        f"tracking.tensorboard.dir={tmp_path / 'tb'}",
        f"tracking.mlflow.uri={mlflow_server.uri}",
    )
    outcome = run_training(config)
    assert outcome.metrics["val_accuracy"] > 0.6  # 4 balanced classes: chance is 0.25
    # Tracked (tracking.tensorboard), read back with TensorBoard's reader: each epoch's metrics at
    # its global step, the logged steps' loss and learning rate, the config, the version it became.
    history = Registry(Storage(str(root))).card("tiny-topics", outcome.version).run.history
    tb = read_tensorboard(tmp_path / "tb" / outcome.run_name)
    assert tb["scalars"]["val/accuracy"] == [(h["global_step"], pytest.approx(h["val_accuracy"])) for h in history]
    assert [s for s, _ in tb["scalars"]["train/loss"]] == [h["global_step"] for h in history]
    assert tb["scalars"]["train/step_loss"] and all(0 < lr < 1 for _, lr in tb["scalars"]["train/lr"])
    assert '"init_from"' in tb["texts"]["config"][0] and f"registered as **tiny-topics:{outcome.version}**" in tb["texts"]["registry"][0]
    # And in MLflow (a real server, read back with its client): one run in the config's experiment,
    # the config as params, the same metrics at the same steps, the version it became.
    tracked = mlflow_server.runs("tiny-topics")[outcome.run_name]
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["train.epochs"] == "4" and tracked.data.params["model.init_from"] == parent
    assert mlflow_server.history(tracked, "val/accuracy") == [(h["global_step"], pytest.approx(h["val_accuracy"])) for h in history]
    assert mlflow_server.history(tracked, "train/step_loss") and mlflow_server.history(tracked, "train/lr")
    assert tracked.data.tags["lifelong.version"] == f"tiny-topics:{outcome.version}"
    assert tracked.data.tags["lifelong.registry"].endswith(f"registry/tiny-topics/versions/{outcome.version}")

    registry = Registry(Storage(str(root)))
    card = registry.card("tiny-topics", outcome.version)
    assert card.parent == parent and card.labels == ["finance", "science", "sports", "weather"]
    before = load_file(registry.resolve(parent).local_dir / "model.safetensors")
    after = load_file(registry.resolve(outcome.ref).local_dir / "model.safetensors")
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(before[name], after[name]), f"{name} changed although frozen"
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert "score.weight" in after

    # Registering a classifier exported it: ONNX within parity tolerance, int8 measured and gated.
    onnx = card.exports["onnx"]
    assert onnx.parity_max_abs_diff <= 1e-4 and card.size_bytes["onnx"] > 0
    int8 = card.exports["onnx-int8"].model_dump() if "onnx-int8" in card.exports else onnx.int8_refused
    assert int8["rows"] > 0 and abs(int8["accuracy_fp32"] - int8["accuracy_int8"] - int8["accuracy_drop"]) < 1e-9
    assert ("onnx-int8" in card.exports) == (int8["accuracy_drop"] <= 0.01)
    from lifelong.inference import Classifier

    texts = ["shares and bonds fell", "the match ended in a draw", "rain and wind tonight"]
    model_dir = registry.local_dir("tiny-topics", outcome.version)
    onnx_labels = [p["label"] for p in Classifier(model_dir, "onnx", card.max_length).predict(texts)]
    assert onnx_labels == [p["label"] for p in Classifier(model_dir, "torch", card.max_length).predict(texts)]


def test_train_last_n_layers_under_zero3_keeps_lower_layers(pretrained, tmp_path):
    """Continued pretraining of only the last block, with ZeRO-3 partitioning every parameter."""
    root = pretrained["root"]
    parent = f"tiny-gpt2:{pretrained['outcome'].version}"
    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={pretrained['config'].data.path}",
        f"storage.root={root}",
        "name=tiny-gpt2-top",
        f"model.init_from={parent}",
        "model.train_last_n_layers=1",
        "train.epochs=1",
        "train.max_steps_per_epoch=5",
        "train.deepspeed.zero_stage=3",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(root)))
    before = load_file(registry.resolve(parent).local_dir / "model.safetensors")
    after = load_file(registry.resolve(outcome.ref).local_dir / "model.safetensors")
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.bias"):
        assert torch.equal(before[name], after[name]), f"{name} changed although frozen"
    assert not torch.equal(before["transformer.h.1.mlp.c_fc.weight"], after["transformer.h.1.mlp.c_fc.weight"])


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "bf16"), (3, "fp32"), (3, "bf16")])
def test_zero_stages_and_precisions_complete(ray_session, demo_data, tmp_path, stage, precision):
    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "train.epochs=1",
        "train.max_steps_per_epoch=4",
        f"train.deepspeed.zero_stage={stage}",
        f"train.precision={precision}",
    )
    outcome = run_training(config)
    card = Registry(Storage(str(tmp_path))).card("tiny-gpt2", outcome.version)
    assert card.run.precision == precision
    assert 0 < outcome.metrics["val_loss"] < 20
    model = AutoModelForCausalLM.from_pretrained(Registry(Storage(str(tmp_path))).resolve(outcome.ref).local_dir)
    # The consolidated copy holds the full fp32 weights, not ZeRO-3 placeholders.
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32


def test_fp16_on_cpu_cluster_is_refused(ray_session, demo_data, tmp_path):
    config = make_config(
        "gpt2/tiny_pretrain.yaml", f"data.path={demo_data / 'corpus.jsonl'}", f"storage.root={tmp_path}", "train.precision=fp16"
    )
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        run_training(config)


@pytest.mark.parametrize("workers", [2, 1], ids=["ray-train", "warm-actor"])
def test_killed_run_resumes_from_its_last_checkpoint(ray_session, demo_data, tmp_path, workers):
    overrides = [
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "run_name=resume-me",
        "train.epochs=4",
        "train.max_steps_per_epoch=15",
        f"scaling.num_workers={workers}",
    ]
    config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt2", "tiny_pretrain.yaml")
    address = ray_session.get_runtime_context().gcs_address
    run_dir = Path(tmp_path) / "runs" / "resume-me"
    # the driver dies mid-run, as with a lost laptop
    results = killed_after_first_checkpoint(
        [sys.executable, "-m", "lifelong.cli", "pretrain", config_path, *overrides, "--address", address], run_dir
    )
    assert results, "the first run never reported a checkpoint"
    last = max(results, key=lambda r: r["metrics"]["epoch"])
    assert last["metrics"]["epoch"] < 4, "the run finished before it could be killed"
    latest = json.loads((run_dir / last["checkpoint_dir_name"] / "state.json").read_text())
    # One worker trains in the driver's warm actor, not in a Ray Train run (no Ray Train snapshot).
    assert (run_dir / "checkpoint_manager_snapshot.json").exists() == (workers > 1)

    outcome = run_training(make_config("gpt2/tiny_pretrain.yaml", *overrides))
    history = Registry(Storage(str(tmp_path))).card("tiny-gpt2", outcome.version).run.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # The epochs before the kill are the first run's, carried over, not retrained.
    assert history[: latest["epoch"]] == latest["history"]
    assert history[-1]["global_step"] == 4 * history[0]["global_step"]

    # Re-running the finished run registers nothing new.
    again = run_training(make_config("gpt2/tiny_pretrain.yaml", *overrides))
    assert again.version == outcome.version
    assert Registry(Storage(str(tmp_path))).versions("tiny-gpt2") == [outcome.version]


def test_a_run_whose_controller_is_killed_gives_its_workers_back_to_the_driver_that_lives_on(ray_session, demo_data, tmp_path, capsys):
    """Without the dashboard Ray Train's own cleaner cannot see a killed controller, and its
    workers' placement group stayed reserved for as long as the driver (a daemon, a notebook)
    lived: two CPUs lost for good per killed run."""
    import threading
    import time

    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "train.epochs=50",
        "scaling.num_workers=2",
    )

    def controllers() -> set[str]:  # (a finished run's controller stays alive, holding nothing)
        actors = ray_session._private.state.actors().values()
        return {a["ActorID"] for a in actors if a["ActorClassName"] == "TrainController" and a["State"] == "ALIVE"}

    free, before = free_cpus_when_settled(), controllers()
    raised = []
    run = threading.Thread(target=lambda: raised.append(pytest.raises(LifelongError, run_training, config)))
    run.start()
    deadline = time.monotonic() + 240
    while not (controllers() - before and ray_session.available_resources().get("CPU", 0) <= free - 2):
        assert time.monotonic() < deadline and run.is_alive(), "the run never reserved its workers"
        time.sleep(0.5)
    (controller,) = controllers() - before
    worker = ray_session._private.worker.global_worker
    worker.core_worker.kill_actor(ray_session.ActorID.from_hex(controller), True)  # ray.kill by id
    run.join(120)
    assert raised and "the same command again resumes it" in str(raised[0].value)
    assert "[lifelong] released placement group" in capsys.readouterr().out
    assert free_cpus_when_settled(free) == free, what_holds_cpus()


def test_a_changed_config_or_data_is_another_run_and_one_run_name_never_mixes_two(pretrained, tmp_path, capsys):
    """Re-running with a new learning rate under the default name used to resume the old run and
    return its version; now it is a new run. A run_name that holds another config or data is
    refused (naming run_name and --resume); --resume continues it anyway."""
    first, root = pretrained["outcome"], pretrained["root"]
    small = [
        f"data.path={pretrained['config'].data.path}",
        f"storage.root={root}",
        "train.epochs=1",
        "train.max_steps_per_epoch=3",
        "scaling.num_workers=1",
        "export.on_register=never",
    ]
    changed = run_training(make_config("gpt2/tiny_pretrain.yaml", *small, "train.lr=1e-3"))
    assert changed.run_name != first.run_name and changed.version != first.version
    registry = Registry(Storage(str(root)))
    assert registry.card("tiny-gpt2", changed.version).config["train"]["lr"] == 1e-3
    assert registry.card("tiny-gpt2", first.version).config["train"]["lr"] == 2e-3

    named = [*small, f"run_name={changed.run_name}"]
    with pytest.raises(
        ConfigError, match=rf"run_name '{changed.run_name}' already holds another run .*changed since: train.lr\).*--resume"
    ):
        run_training(make_config("gpt2/tiny_pretrain.yaml", *named, "train.lr=5e-4"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line for i, line in enumerate(open(pretrained["config"].data.path).readlines()) if i % 2))
    with pytest.raises(ConfigError, match=r"changed since: data files"):
        run_training(make_config("gpt2/tiny_pretrain.yaml", *named, "train.lr=1e-3", f"data.path={other}"))
    versions = registry.versions("tiny-gpt2")
    capsys.readouterr()
    forced = run_training(make_config("gpt2/tiny_pretrain.yaml", *named, "train.lr=5e-4"), resume=True)
    assert forced.version == changed.version  # continued the finished run: nothing new to register
    out = capsys.readouterr().out
    assert f"run '{changed.run_name}' finished its 1 epoch(s) already: nothing to train" in out, out[-2000:]
    assert registry.versions("tiny-gpt2") == versions


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_config_trains_on_gpus_with_nccl(ray_session, demo_data, tmp_path):
    """The CPU config unchanged but for the scaling: GPUs are detected, precision auto picks bf16/fp16."""
    config = make_config(
        "gpt2/tiny_pretrain.yaml",
        f"data.path={demo_data / 'corpus.jsonl'}",
        f"storage.root={tmp_path}",
        "train.epochs=2",
        "train.max_steps_per_epoch=20",
        f"scaling.num_workers={min(2, torch.cuda.device_count())}",
    )
    outcome = run_training(config)
    card = Registry(Storage(str(tmp_path))).card("tiny-gpt2", outcome.version)
    assert card.run.precision in ("bf16", "fp16")
    history = card.run.history
    assert history[-1]["val_loss"] < history[0]["val_loss"]
