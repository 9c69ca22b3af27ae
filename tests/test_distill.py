"""continual.distill_weight: the replayed rows of a cycle are marked through tokenization, and the
loop's distillation term counts those rows alone, against the champion's logits."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from conftest import LABELS
from lifelong.config import ModelConfig
from lifelong.data import REPLAYED, tokenize_for_classification
from lifelong.models import build_model, load_tokenizer
from lifelong.train.loop import distillation_loss


def test_replayed_rows_are_marked_through_tokenization_and_only_they_are_distilled(tiny_tokenizer):
    table = pa.table({"text": ["rain tonight", "stocks fell", "a new frog", "the match"], "label": [3, 0, 1, 2], REPLAYED: [0, 1, 0, 1]})
    tokenized = tokenize_for_classification(table, str(tiny_tokenizer), 8)
    assert tokenized[REPLAYED].tolist() == [0, 1, 0, 1]
    assert REPLAYED not in tokenize_for_classification(table.drop_columns([REPLAYED]), str(tiny_tokenizer), 8)
    batch = {k: torch.from_numpy(v) for k, v in tokenized.items()}

    torch.manual_seed(0)
    cfg = ModelConfig(task="sequence-classification", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=8)
    champion = build_model(cfg, load_tokenizer(tiny_tokenizer), labels=LABELS).eval()
    with torch.no_grad():
        own = champion(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert distillation_loss(champion, batch, own).item() == pytest.approx(0.0, abs=1e-9)  # the champion's own answers

    moved = own.clone()
    moved[[0, 2]] += 5.0  # new rows may move freely
    assert distillation_loss(champion, batch, moved).item() == pytest.approx(0.0, abs=1e-9)
    moved[1] += 2.0  # a replayed row moved by 2 on each of its 4 logits: 16 over 2 rows x 4 logits
    moved.requires_grad_(True)
    loss = distillation_loss(champion, batch, moved)
    assert loss.item() == pytest.approx(2.0, rel=1e-5)
    loss.backward()  # it pulls the candidate's replayed rows back towards the champion, and only those
    assert moved.grad[1].tolist() == pytest.approx([0.5] * 4) and not moved.grad[[0, 2, 3]].any()
