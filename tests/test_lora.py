"""LoRA adapters (train.lora, PEFT) on a registered language model: only the adapters train and
are registered, naming the version they adapt; loading, export and serving merge them into it;
a continual cycle trains a fresh adapter on its champion and the endpoint swaps to it."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from conftest import ask_until_stopped, doc_lm_config, doc_lm_stream, drop, make_config, wait_for_version
from lifelong.errors import ConfigError
from lifelong.registry import Registry
from lifelong.storage import Storage

LORA = "train.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: [c_attn, c_proj, c_fc]}"


def unmerged(base_dir: Path, adapter_dir: Path):
    """The base model with the adapters beside its weights (PEFT's forward: base + B·A), not merged."""
    from peft import PeftModel

    from lifelong.models import load_for_inference

    return PeftModel.from_pretrained(load_for_inference(base_dir, "causal-lm"), str(adapter_dir)).eval()


@pytest.mark.slow
def test_lora_trains_only_adapters_registers_them_alone_and_merged_exports_equal_base_plus_adapter(pretrained, tmp_path):
    import onnxruntime as ort

    from lifelong.config import ExportSection
    from lifelong.evaluate import evaluate_model
    from lifelong.export import export_version
    from lifelong.models import load_for_inference
    from lifelong.synth import write_instruction_dataset
    from lifelong.train.driver import run_training

    write_instruction_dataset(tmp_path / "train.jsonl", 800, seed=0)
    write_instruction_dataset(tmp_path / "held_out.jsonl", 60, seed=1)
    base = f"tiny-gpt2:{pretrained['outcome'].version}"
    config = make_config(
        "gpt2/tiny_lora.yaml",
        f"storage.root={pretrained['root']}",
        f"data.path={tmp_path / 'train.jsonl'}",
        f"model.init_from={base}",
        "train.epochs=5",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(pretrained["root"])))
    ref = f"tiny-gpt2-lora:{outcome.version}"
    card = registry.card("tiny-gpt2-lora", outcome.version)
    base_dir = registry.resolve(base).local_dir

    # The version holds the adapters alone (no tokenizer, no base weights), and names its base.
    assert set(card.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert card.base == card.parent == base
    # A fifth of the base here, where the token embeddings are half the model (a GPT-2 of 124M
    # parameters takes 1.6% with the same adapters: benchmarks/lora.py)
    assert sum(card.files.values()) < (base_dir / "model.safetensors").stat().st_size / 4
    adapters = load_file(str(registry.local_dir("tiny-gpt2-lora", outcome.version) / "adapter_model.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)

    # The base's weights came out of training bit-identical: every non-adapter tensor of the run's
    # DeepSpeed checkpoint equals the base version's, at the precision training held them in.
    states = Path(card.run.checkpoint) / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    base_weights = load_file(str(base_dir / "model.safetensors"))
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in module.items() if "lora_" not in k}
    assert set(base_weights) <= set(frozen)
    assert all(torch.equal(frozen[k], base_weights[k].to(frozen[k].dtype)) for k in base_weights)

    # Loading the version merges the adapters into the base: the same logits as PEFT's unmerged
    # forward, in PyTorch and in the ONNX export (which is of the merged model).
    merged_dir = registry.resolve(ref).local_dir
    ids = torch.randint(0, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = unmerged(base_dir, registry.local_dir("tiny-gpt2-lora", outcome.version))(input_ids=ids, attention_mask=mask).logits
        merged = load_for_inference(merged_dir, "causal-lm")(input_ids=ids, attention_mask=mask).logits
        before = load_for_inference(base_dir, "causal-lm")(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(merged, expected, atol=1e-4) and not torch.allclose(merged, before, atol=1e-2)
    export_version(registry, "tiny-gpt2-lora", outcome.version, ExportSection(), None, ("onnx",))
    onnx = registry.local_dir("tiny-gpt2-lora", outcome.version) / "model.onnx"
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    feed = {i.name: {"input_ids": ids, "attention_mask": mask}[i.name].numpy() for i in session.get_inputs()}
    assert abs(session.run(None, feed)[0] - expected.numpy()).max() < 1e-4

    # It answers held-out prompts far better than its base.
    scores = {r: evaluate_model(config, r, str(tmp_path / "held_out.jsonl"), generate_rows=60).metrics for r in (base, ref)}
    print({r: {k: round(v, 3) for k, v in m.items()} for r, m in scores.items()})
    assert scores[ref]["bleu"] > scores[base]["bleu"] + 5 and scores[ref]["loss"] < scores[base]["loss"] / 2


def test_lora_settings_that_cannot_work_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.lora trains adapters on a pretrained model: set model.init_from"):
        make_config("gpt2/tiny_pretrain.yaml", LORA)
    with pytest.raises(ConfigError, match="ZeRO 0-2"):
        make_config("gpt2/tiny_lora.yaml", "train.deepspeed.zero_stage=3")
    with pytest.raises(ConfigError, match="remove model.train_last_n_layers"):
        make_config("gpt2/tiny_lora.yaml", "model.train_last_n_layers=1")
    with pytest.raises(ConfigError, match="train.lora adapts a causal-lm, sequence-classification, image-classification model; "):
        make_config("vit/tiny_mae_pretrain.yaml", LORA)
    with pytest.raises(ConfigError, match="continual.new_labels: grow cannot add classes to it"):
        make_config("gpt2/tiny_continual.yaml", LORA, "continual.new_labels=grow")


def test_lora_on_a_directory_is_refused_before_any_data_is_read(tiny_tokenizer, tmp_path):
    from lifelong.models import build_model, load_tokenizer
    from lifelong.train.driver import prepare_run

    model = build_model(make_config("gpt2/tiny_pretrain.yaml").model, load_tokenizer(tiny_tokenizer))
    model.save_pretrained(tmp_path / "plain")
    config = make_config(
        "gpt2/tiny_lora.yaml",
        f"storage.root={tmp_path / 'store'}",
        f"data.path={tmp_path / 'none.jsonl'}",  # never read
        f"model.init_from={tmp_path / 'plain'}",
    )
    with pytest.raises(ConfigError, match="train.lora needs model.init_from to be a registry version"):
        prepare_run(config)


@pytest.mark.slow
def test_a_text_classifier_takes_adapters_and_its_head_alone_and_merged_exports_equal_them(pretrained, tiny_tokenizer, demo_data, tmp_path):
    """LoRA for classification on the session's pretrained tiny GPT-2 (a language model: PEFT's
    SEQ_CLS builds its head and trains it whole beside the adapters): the version holds the
    adapters and the head, names its base, classifies the topics far better than a head trained
    alone would from chance, and its merged model (what export and serving load) equals PEFT's
    unmerged forward, the base's other weights bit-identical; ONNX exported on register with
    parity. On a classifier base, a label set other than its own is refused before anything trains."""
    from conftest import register_tiny
    from lifelong.evaluate import evaluate_model
    from lifelong.models import build_model, load_for_inference, load_tokenizer
    from lifelong.train.driver import prepare_run, run_training

    root = pretrained["root"]
    registry = Registry(Storage(str(root)))
    base = f"tiny-gpt2:{pretrained['outcome'].version}"
    classifier_lora = "train.lora={r: 8, alpha: 16, dropout: 0.0, target_modules: [c_attn, c_fc]}"
    args = [
        "gpt2/tiny_finetune.yaml",
        f"storage.root={root}",
        f"data.path={demo_data / 'topics.jsonl'}",
        f"model.init_from={base}",
        "model.max_length=32",
        "name=lora-topics",
        classifier_lora,
        "train.lr=1e-2",
        "train.epochs=12",  # adapters on a barely pretrained 2-layer base learn slowly: chance after 3 epochs, 0.85 after 8
        "train.precision=fp32",
        "scaling.num_workers=1",
    ]
    classifier = register_tiny(registry, "lora-base-classifier", tiny_tokenizer, tmp_path / "work", seed=3, export=False)
    with pytest.raises(ConfigError, match=r"data.labels is \['weather', 'sports', 'science', 'finance'\]: set the same labels"):
        other_labels = "data.labels=[weather, sports, science, finance]"
        prepare_run(make_config(*args, f"model.init_from=lora-base-classifier:{classifier}", other_labels))
    outcome = run_training(make_config(*args))
    card = registry.card("lora-topics", outcome.version)
    assert card.base == base and {"adapter_config.json", "adapter_model.safetensors"} <= set(card.files)
    version_dir = registry.local_dir("lora-topics", outcome.version)
    saved = load_file(version_dir / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any(".score." in k for k in saved)  # adapters and the head
    assert not any("wte" in k or "ln_f" in k for k in saved)

    merged_dir = registry.resolve(outcome.ref).local_dir
    base_dir = registry.resolve(base).local_dir
    merged, plain = load_for_inference(merged_dir, "sequence-classification"), load_for_inference(base_dir, "causal-lm")
    from peft import PeftModel

    labelled = build_model(make_config(*args).model, load_tokenizer(base_dir), init_dir=base_dir, labels=card.labels)
    peft = PeftModel.from_pretrained(labelled, str(version_dir)).eval()
    ids = torch.randint(0, 500, (4, 20))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)
    base_state, merged_state = plain.state_dict(), merged.state_dict()
    for name in ("transformer.wte.weight", "transformer.ln_f.weight", "transformer.h.0.attn.c_proj.weight"):
        assert torch.equal(base_state[name], merged_state[name])  # not adapted: the base's own
    assert not torch.equal(base_state["transformer.h.0.attn.c_attn.weight"], merged_state["transformer.h.0.attn.c_attn.weight"])

    config = make_config(*args)
    accuracy = evaluate_model(config, outcome.ref, str(demo_data / "topics.jsonl")).metrics["accuracy"]
    assert accuracy > 0.8  # four topics: chance is 0.25
    assert card.exports["onnx"].parity_max_abs_diff < 1e-4 and "onnx-int8" in card.exports  # the merged model's


@pytest.mark.slow
def test_a_continual_cycle_trains_a_fresh_adapter_on_its_champion_and_the_endpoint_swaps_to_it(tiny_tokenizer, serve_port, tmp_path):
    from ray import serve

    from lifelong.config import absolute_paths, validate_config
    from lifelong.continual.cycle import run_cycle
    from lifelong.serve import deploy

    stream = doc_lm_stream("doc-lora", tiny_tokenizer, tmp_path)
    root, landing, registry, v1, windows = (stream[k] for k in ("root", "landing", "registry", "v1", "windows"))
    config = doc_lm_config(
        "doc-lora",
        root,
        landing,
        "train.lr=1e-2",
        LORA,
        "continual.gates.max_relative_increase=10.0",  # this test is about the swap, not the gate
    )
    serve_cfg = {"port": serve_port, "num_replicas": 1, "poll_interval_s": 0.3, "route_prefix": "/doc-lora", "app_name": "doc-lora"}
    url = deploy(absolute_paths(validate_config({"name": "doc-lora", "storage": {"root": str(root)}, "serve": serve_cfg})))
    results, stop = [], threading.Event()
    asked = {"prompt": "The for statement", "max_new_tokens": 3}
    client = threading.Thread(target=ask_until_stopped, args=(url, "/v1/generate", asked, results, stop))
    client.start()
    try:
        versions = []
        for window in windows:
            drop(window, landing)
            outcome = run_cycle(config)
            print(outcome.summary())
            assert outcome.status == "promoted", outcome.summary()
            versions.append(outcome.version)
        # Each cycle's candidate is adapters on the champion of its moment: the second's base is the first's.
        cards = [registry.card("doc-lora", v) for v in versions]
        assert [c.base for c in cards] == [f"doc-lora:{v1}", f"doc-lora:{versions[0]}"]
        assert all(set(c.files) == {"adapter_config.json", "adapter_model.safetensors"} for c in cards)

        def served():
            return httpx.post(url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 1}, timeout=30).json()["version"]

        assert wait_for_version(served, versions[-1]) == versions[-1]
        # The endpoint answers as the merged chain does: v1 + adapters 1 + adapters 2, greedy.
        from lifelong.inference import Generator

        prompt = "The for statement"
        expected = Generator(registry.resolve(f"doc-lora:{versions[-1]}").local_dir).generate(prompt, 6)["text"]
        answer = httpx.post(url + "/v1/generate", json={"prompt": prompt, "max_new_tokens": 6}, timeout=30).json()
        assert answer["text"] == expected
    finally:
        stop.set()
        client.join()
        serve.delete("doc-lora")
    assert results and all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
    assert {v for _, v in results} <= {v1, *versions} and versions[-1] in {v for _, v in results}
