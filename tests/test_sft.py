"""Instruction fine-tuning: prompt/response rows judged like any rows, the loss on the response's
tokens only, the same DeepSpeed loop, and `lifelong evaluate` answering held-out prompts scored
with BLEU, chrF and exact match (sacrebleu)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_config
from lifelong.config import DataConfig, ModelConfig
from lifelong.data import RESPONSE, parse_file
from lifelong.models import build_model, load_tokenizer
from lifelong.tasks.causal_lm import instruction_rows, loss_weight, tokenize


def test_an_instruction_row_is_labelled_on_its_response_and_eos_only(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    prompts, responses = ["What is this about? rain and storm tonight", "Name it: stocks fell"], ["weather", "finance, it says stocks"]
    rows = instruction_rows(prompts, responses, tok, 48)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids, r_ids = tok(p, add_special_tokens=False)["input_ids"], tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(r_ids)
        assert n < 48 and rows["input_ids"][i, :n].tolist() == p_ids + r_ids
        assert rows["attention_mask"][i].tolist() == [1] * n + [0] * (48 - n)
        assert rows["labels"][i].tolist() == [-100] * len(p_ids) + r_ids + [-100] * (48 - n)  # the prompt and padding: no loss
    # Through the family's tokenize (rows with a response column) the same; the loop averages over the response tokens.
    batch = tokenize(pa.table({"text": prompts, "label": [-1, -1], RESPONSE: responses}), str(tiny_tokenizer), 48)
    assert np.array_equal(batch["labels"], rows["labels"]) and loss_weight(batch) == int((rows["labels"] != -100).sum())

    # The model's loss is the cross-entropy of the response tokens alone.
    torch.manual_seed(0)
    model = build_model(ModelConfig(task="causal-lm", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=48), tok).eval()
    t = {k: torch.from_numpy(v) for k, v in rows.items()}
    with torch.no_grad():
        out = model(**t)
    logits, labels = out.logits[:, :-1], t["labels"][:, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # A response longer than the row is cut, keeping one prompt token; a long prompt keeps its end.
    long = instruction_rows(["a " * 40 + "end"], ["b " * 40], tok, 16)
    assert (long["labels"][0, 1:] != -100).all() and long["labels"][0, 0] == -100


def test_packed_instruction_rows_fill_blocks_with_whole_rows_labelled_as_unpacked(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    prompts = [f"What is this about? rain and storm {'tonight ' * (i % 4)}" for i in range(12)]
    responses = [f"It is about weather: it says {'rain ' * (1 + i % 3)}" for i in range(12)]
    padded = instruction_rows(prompts, responses, tok, 128)
    packed = instruction_rows(prompts, responses, tok, 128, pack=True)
    assert len(packed["input_ids"]) <= len(padded["input_ids"]) / 2  # fewer, fuller blocks
    # The same tokens and labels in the same order: each padded row's real part, concatenated.
    rows = [(padded["input_ids"][i][m.astype(bool)], padded["labels"][i][m.astype(bool)]) for i, m in enumerate(padded["attention_mask"])]
    real = packed["attention_mask"].astype(bool)
    assert np.array_equal(packed["input_ids"][real], np.concatenate([r[0] for r in rows]))
    assert np.array_equal(packed["labels"][real], np.concatenate([r[1] for r in rows]))
    assert (packed["labels"][~real] == -100).all() and loss_weight(packed) <= loss_weight(padded)
    # Rows are never split: every block starts with a row's first token and holds whole rows.
    starts = np.cumsum([0] + [len(r[0]) for r in rows])[:-1]
    offset = 0
    for block in packed["attention_mask"]:
        assert offset in starts
        offset += int(block.sum())
    # Through the family's tokenize (data.pack), the same blocks.
    batch = tokenize(pa.table({"text": prompts, "label": [-1] * 12, RESPONSE: responses}), str(tiny_tokenizer), 128, pack=True)
    assert np.array_equal(batch["input_ids"], packed["input_ids"])
    with pytest.raises(ValueError, match="data.pack packs instruction rows"):
        DataConfig(path="x", pack=True)


def test_generation_metrics_settings_that_cannot_work_are_refused_naming_the_key():
    from lifelong.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tune.metric=val_bleu: measured only when train.eval_generate_rows > 0"):
        make_config("gpt2/tiny_sft.yaml", "tune.metric=val_bleu", "tune.mode=max")
    with pytest.raises(ConfigError, match=r"tune.mode: min would keep the worst answers"):
        make_config("gpt2/tiny_sft.yaml", "train.eval_generate_rows=10", "tune.metric=val_bleu")
    with pytest.raises(ConfigError, match=r"it needs instruction data"):
        make_config("gpt2/tiny_pretrain.yaml", "train.eval_generate_rows=10")
    with pytest.raises(ConfigError, match=r"zero_stage to 2 or less"):
        make_config("gpt2/tiny_sft.yaml", "train.eval_generate_rows=10", "train.deepspeed.zero_stage=3")


def test_prompt_and_response_columns_are_judged_like_text(tmp_path):
    lines = [
        {"prompt": "What is this about? rain", "response": "weather"},
        {"prompt": "What is this about? goal", "response": ""},  # empty_response
        {"prompt": "What is this about? bank", "response": ["finance"]},  # wrong_response_type
        {"prompt": "", "response": "science"},  # empty_text
        {"prompt": "What is this about? atom", "response": "science"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = DataConfig(path=str(path), prompt_column="prompt", response_column="response")
    parsed = parse_file(_fetched(path), "jsonl", cfg, "sft.jsonl")
    assert not parsed.reason and parsed.rows.column_names == ["text", "label", "split", RESPONSE]
    assert parsed.rows.column(RESPONSE).to_pylist() == ["weather", "science"]
    assert parsed.dropped == {"empty_response": 1, "wrong_response_type": 1, "empty_text": 1}
    missing = tmp_path / "no_response.jsonl"
    missing.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert "response" in parse_file(_fetched(missing), "jsonl", cfg, "no_response.jsonl").reason
    with pytest.raises(ValueError, match="go together"):
        DataConfig(path="x", prompt_column="prompt")


def _fetched(path):
    import pyarrow.fs as pafs

    from lifelong.data import fetch

    fetched, _ = fetch(pafs.LocalFileSystem(), str(path))
    return fetched


@pytest.mark.slow
def test_instruction_fine_tuning_answers_held_out_prompts_far_better_than_its_base(pretrained, tmp_path):
    """SFT from the session's pretrained tiny GPT-2 (2 DeepSpeed workers), then `lifelong
    evaluate` on prompts of another seed: BLEU and chrF of the answers well above the base's."""
    from lifelong.evaluate import evaluate_model
    from lifelong.synth import write_instruction_dataset
    from lifelong.train.driver import run_training

    write_instruction_dataset(tmp_path / "train.jsonl", 800, seed=0)
    write_instruction_dataset(tmp_path / "held_out.jsonl", 60, seed=1)
    base = f"tiny-gpt2:{pretrained['outcome'].version}"
    config = make_config(
        "gpt2/tiny_sft.yaml",
        f"storage.root={pretrained['root']}",
        f"data.path={tmp_path / 'train.jsonl'}",
        f"model.init_from={base}",
        "train.epochs=5",
    )
    outcome = run_training(config)
    assert outcome.version is not None
    scores = {
        ref: evaluate_model(config, ref, str(tmp_path / "held_out.jsonl"), generate_rows=60).metrics
        for ref in (base, f"tiny-gpt2-sft:{outcome.version}")
    }
    print({ref: {k: round(v, 3) for k, v in m.items()} for ref, m in scores.items()})
    before, after = scores[base], scores[f"tiny-gpt2-sft:{outcome.version}"]
    assert after["generated"] == before["generated"] == 60
    assert after["bleu"] > before["bleu"] + 5 and after["chrf"] > before["chrf"] + 15
    assert after["loss"] < before["loss"] / 2  # the response tokens' loss


@pytest.mark.slow
def test_packed_sft_reports_bleu_on_validation_prompts_each_epoch_and_keeps_the_best_checkpoint_by_it(pretrained, tmp_path):
    """data.pack and train.eval_generate_rows: the run trains on fewer, fuller blocks, answers 20
    validation prompts after every epoch (val_bleu, val_chrf, val_exact_match), and registers
    the epoch with the highest val_bleu; the registered model, scored by `lifelong evaluate`'s
    own code on the same prompts, gets the same BLEU (fp32: the same greedy answers)."""
    from lifelong.data import read_validated
    from lifelong.models import load_for_inference, load_tokenizer
    from lifelong.registry import Registry
    from lifelong.storage import Storage
    from lifelong.synth import write_instruction_dataset
    from lifelong.tasks.causal_lm import reference_metrics
    from lifelong.train.driver import run_training

    write_instruction_dataset(tmp_path / "long.jsonl", 800, seed=2)
    short = []  # prompts cut to the words the answer needs, so that two rows fit one block of 64 tokens
    for line in (tmp_path / "long.jsonl").read_text().splitlines():
        row = json.loads(line)
        word = row["response"].rsplit(" ", 1)[1].rstrip(".")
        short.append({"prompt": f"What is this about? {word}", "response": row["response"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    rows = len(short)
    config = make_config(
        "gpt2/tiny_sft.yaml",
        f"storage.root={pretrained['root']}",
        f"data.path={tmp_path / 'train.jsonl'}",
        f"model.init_from=tiny-gpt2:{pretrained['outcome'].version}",
        "name=tiny-gpt2-packed",
        "data.pack=true",
        "train.eval_generate_rows=20",
        "train.precision=fp32",
        "train.epochs=6",
        "train.checkpoint={num_to_keep: 2, score_attribute: val_bleu, score_order: max}",
    )
    outcome = run_training(config)
    registry = Registry(Storage(str(pretrained["root"])))
    card = registry.card("tiny-gpt2-packed", outcome.version)
    history = card.run.history
    assert all({"val_bleu", "val_chrf", "val_exact_match"} <= set(h) for h in history)
    assert card.metrics["val_bleu"] == max(h["val_bleu"] for h in history) > 5  # it learned to answer
    # Packed: fewer blocks than rows, so fewer steps than one padded row per block would take.
    train_rows = rows * (1 - config.data.validation_fraction)
    assert history[0]["global_step"] < 0.8 * train_rows / (config.train.batch_size * config.scaling.num_workers)

    validation = read_validated(config.data, Storage(str(pretrained["root"])), quarantine_area="t").split_rows("validation")
    sample = validation.slice(0, 20) if hasattr(validation, "slice") else None
    sample = sample.to_pylist() if sample is not None else validation.take(20)
    model_dir = registry.resolve(outcome.ref).local_dir
    scored = reference_metrics(
        load_for_inference(model_dir, "causal-lm"),
        load_tokenizer(model_dir),
        [r["text"] for r in sample],
        [r["response"] for r in sample],
        config.serve.max_new_tokens,
    )
    assert scored["bleu"] == pytest.approx(card.metrics["val_bleu"], abs=1e-6)
