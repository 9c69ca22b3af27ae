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
