"""continual.distill_weight: the replayed rows of a cycle are marked through tokenization, and the
loop's distillation term counts those rows alone, against the champion's logits.
continual.replay_weighting=history: the loop weighs the marked rows as the cycle's weights say.
continual.replay_refresh=epoch: each epoch trains on the new rows and its own sample's."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from conftest import LABELS
from lifelong.config import ModelConfig
from lifelong.continual.cycle import history_weights
from lifelong.data import REPLAYED
from lifelong.models import build_model, load_tokenizer
from lifelong.tasks.text_classification import tokenize as tokenize_for_classification
from lifelong.train.loop import distillation_loss, epoch_sample, weighted_loss


def test_replayed_rows_are_marked_through_tokenization_and_only_they_are_distilled(tiny_tokenizer):
    table = pa.table({"text": ["rain tonight", "stocks fell", "a new frog", "the match"], "label": [3, 0, 1, 2], REPLAYED: [0, 1, 0, 1]})
    tokenized = tokenize_for_classification(table, str(tiny_tokenizer), 8)
    assert tokenized[REPLAYED].tolist() == [0, 1, 0, 1]
    assert REPLAYED not in tokenize_for_classification(table.drop_columns([REPLAYED]), str(tiny_tokenizer), 8)
    batch = {k: torch.from_numpy(v) for k, v in tokenized.items()}
    inputs, replayed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch[REPLAYED].bool()

    torch.manual_seed(0)
    cfg = ModelConfig(task="sequence-classification", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=8)
    champion = build_model(cfg, load_tokenizer(tiny_tokenizer), labels=LABELS).eval()
    with torch.no_grad():
        own = champion(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert distillation_loss(champion, inputs, replayed, own).item() == pytest.approx(0.0, abs=1e-9)  # the champion's own answers

    moved = own.clone()
    moved[[0, 2]] += 5.0  # new rows may move freely
    assert distillation_loss(champion, inputs, replayed, moved).item() == pytest.approx(0.0, abs=1e-9)
    moved[1] += 2.0  # a replayed row moved by 2 on each of its 4 logits: 16 over 2 rows x 4 logits
    moved.requires_grad_(True)
    loss = distillation_loss(champion, inputs, replayed, moved)
    assert loss.item() == pytest.approx(2.0, rel=1e-5)
    loss.backward()  # it pulls the candidate's replayed rows back towards the champion, and only those
    assert moved.grad[1].tolist() == pytest.approx([0.5] * 4) and not moved.grad[[0, 2, 3]].any()


def test_history_weights_give_the_new_window_its_share_of_all_rows_seen_at_a_mean_weight_of_one():
    # Window 5 of a stream of 1,000-row windows: 800 new rows, 800 replayed standing for the 4,000 before.
    w = history_weights(new=800, replayed=800, seen=4000)
    assert w["new"] * 800 / (w["new"] * 800 + w["replayed"] * 800) == pytest.approx(800 / 4800)
    assert (w["new"] * 800 + w["replayed"] * 800) / 1600 == pytest.approx(1.0)
    assert w["replayed"] / w["new"] == pytest.approx(5.0)
    # The first replayed window (as many rows seen as replayed): every row alike.
    assert history_weights(new=800, replayed=800, seen=800) == pytest.approx({"new": 1.0, "replayed": 1.0})


def test_the_weighted_loss_is_the_models_own_at_equal_weights_and_weighs_replayed_rows_as_told(tiny_tokenizer):
    table = pa.table({"text": ["rain tonight", "stocks fell", "a new frog", "the match"], "label": [3, 0, 1, 2], REPLAYED: [0, 1, 0, 1]})
    batch = {k: torch.from_numpy(v) for k, v in tokenize_for_classification(table, str(tiny_tokenizer), 8).items()}
    torch.manual_seed(0)
    cfg = ModelConfig(task="sequence-classification", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=8)
    model = build_model(cfg, load_tokenizer(tiny_tokenizer), labels=LABELS).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert weighted_loss(out.logits, batch, {"new": 1.0, "replayed": 1.0}).item() == pytest.approx(out.loss.item(), rel=1e-6)
    per_row = torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")
    expected = (0.5 * per_row[0] + 1.5 * per_row[1] + 0.5 * per_row[2] + 1.5 * per_row[3]) / 4
    assert weighted_loss(out.logits, batch, {"new": 0.5, "replayed": 1.5}).item() == pytest.approx(expected.item(), rel=1e-6)


def test_an_epoch_trains_on_the_new_rows_and_its_own_sample_in_exactly_the_batches_planned():
    # 6 new rows (0) and two samples of 4 (1, 2), in batches of 5 as a shard hands them over.
    marks = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    rows = torch.arange(14)
    shard = [{"row": rows[i : i + 5], REPLAYED: marks[i : i + 5]} for i in range(0, 14, 5)]

    def epoch(sample, batch_size, count):
        return [b["row"].tolist() for b in epoch_sample(iter(shard), sample, batch_size, count)]

    assert epoch(1, 4, 3) == [[0, 1, 3, 4], [6, 7, 9, 10], [12, 13]]  # 10 rows: 4 + 4 + 2
    assert epoch(2, 4, 3) == [[0, 2, 3, 5], [6, 8, 9, 11], [12, 13]]
    # Another worker's shard holds more of a sample's rows, or fewer: the same number of batches.
    assert epoch(1, 4, 2) == [[0, 1, 3, 4], [6, 7, 9, 10]]
    assert epoch(1, 4, 4) == [[0, 1, 3, 4], [6, 7, 9, 10], [12, 13], [0, 1, 3, 4]]
    seen = []
    drained = epoch_sample((seen.append(b) or b for b in shard), 1, 4, 1)
    assert [b["row"].tolist() for b in drained] == [[0, 1, 3, 4]] and len(seen) == 3  # the whole shard was read


def test_a_language_models_replayed_text_is_packed_apart_and_its_rows_weighed_by_their_mean_token_loss(tiny_tokenizer):
    from lifelong.tasks.causal_lm import tokenize as tokenize_for_lm

    texts = ["the weather is rain and storm tonight " * 3, "stocks fell in the market today " * 3, "a new frog in the lab " * 3]
    table = pa.table({"text": texts * 4, REPLAYED: [0, 1, 2] * 4})
    packed = tokenize_for_lm(table, str(tiny_tokenizer), 16)
    tok = load_tokenizer(tiny_tokenizer)
    for mark, text in enumerate(texts):  # each mark's blocks hold only its own rows' tokens
        own = set(tok(text)["input_ids"]) | {tok.eos_token_id}
        blocks = packed["input_ids"][packed[REPLAYED] == mark]
        assert len(blocks) >= 1 and set(blocks.ravel().tolist()) <= own
    unmarked = tokenize_for_lm(table.drop_columns([REPLAYED]), str(tiny_tokenizer), 16)
    assert REPLAYED not in unmarked and unmarked["input_ids"].shape[1] == 16

    batch = {k: torch.from_numpy(v) for k, v in packed.items()}
    torch.manual_seed(0)
    cfg = ModelConfig(task="causal-lm", hf_config={"n_layer": 1, "n_embd": 16, "n_head": 2}, max_length=16)
    model = build_model(cfg, tok).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    # Full blocks: at equal weights, the model's own mean next-token loss.
    assert weighted_loss(out.logits, batch, {"new": 1.0, "replayed": 1.0}).item() == pytest.approx(out.loss.item(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none").mean(1)
    w = torch.where(batch[REPLAYED].bool(), 2.0, 0.5)
    assert weighted_loss(out.logits, batch, {"new": 0.5, "replayed": 2.0}).item() == pytest.approx((ce * w).mean().item(), rel=1e-5)
