"""Data: quarantine of unreadable files, row drops counted per reason, a stable split, tokenizing."""

import json

import pandas as pd
import pytest

from lifelong.config import DataConfig
from lifelong.data import read_validated, split_of, tokenized
from lifelong.errors import DataError
from lifelong.storage import Storage

LABELS = ["neg", "pos"]


def cfg(path, **kw):
    return DataConfig(path=str(path), label_column="label", labels=LABELS, validation_fraction=0.3, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def good_rows(n, start=0):
    return [{"text": f"row number {i} is fine", "label": LABELS[i % 2]} for i in range(start, start + n)]


def test_bad_files_are_quarantined_and_bad_rows_counted(ray_session, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", good_rows(20) + [
        {"text": "", "label": "pos"}, {"text": "   ", "label": "neg"}, {"text": None, "label": "neg"},
        {"text": "fine text", "label": "maybe"}, {"text": "no label here", "label": None},
    ])
    pd.DataFrame(good_rows(10, 100)).to_parquet(d / "b.parquet")
    pd.DataFrame(good_rows(10, 200)).to_csv(d / "c.csv", index=False)
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "broken.jsonl").write_text('{"text": "ok", "label": "pos"}\n{not json\n')
    write_jsonl(d / "schema.jsonl", [{"body": "wrong column", "label": "pos"}])
    (d / "notes.txt").write_text("not a data file")

    storage = Storage(str(tmp_path / "store"))
    data = read_validated(cfg(d), storage, quarantine_area="t")
    report = data.report
    assert sorted(f.path.rsplit("/", 1)[1] for f in report.used_files) == ["a.jsonl", "b.parquet", "c.csv"]
    reasons = {f.path.rsplit("/", 1)[1]: f.reason for f in report.quarantined}
    assert set(reasons) == {"broken.parquet", "broken.jsonl", "schema.jsonl", "notes.txt"}
    assert "unreadable as parquet" in reasons["broken.parquet"]
    assert "unreadable as jsonl" in reasons["broken.jsonl"]
    assert "missing column(s) ['text']" in reasons["schema.jsonl"]
    assert "unknown file type" in reasons["notes.txt"]
    assert report.dropped == {"empty_text": 3, "unknown_label": 1, "missing_label": 1}
    assert report.rows["train"] + report.rows["validation"] == 40
    # Quarantined copies sit beside their reasons; the source files are untouched.
    assert storage.exists("quarantine/t/broken.parquet")
    assert "unreadable" in storage.read_json("quarantine/t/broken.parquet.reason.json")["reason"]
    assert (d / "broken.parquet").exists()
    rows = data.split(None).take_all()
    assert len(rows) == 40 and {r["label"] for r in rows} == {0, 1}


def test_nothing_valid_fails_with_reasons(ray_session, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "", "label": "pos"}, {"text": "x", "label": "other"}])
    with pytest.raises(DataError, match=r"no valid rows.*empty_text=1.*unknown_label=1"):
        read_validated(cfg(d), Storage(str(tmp_path / "s")), "t")
    (d / "a.jsonl").write_text("garbage{")
    with pytest.raises(DataError, match="every file was quarantined"):
        read_validated(cfg(d), Storage(str(tmp_path / "s")), "t")
    with pytest.raises(DataError, match="does not exist"):
        read_validated(cfg(tmp_path / "missing"), Storage(str(tmp_path / "s")), "t")
    with pytest.raises(DataError, match="no data files match"):
        read_validated(cfg(tmp_path / "*.parquet"), Storage(str(tmp_path / "s")), "t")


def test_split_is_stable_across_runs_and_increments(ray_session, tmp_path):
    write_jsonl(tmp_path / "w1.jsonl", good_rows(200))
    storage = Storage(str(tmp_path / "s"))

    def splits(path):
        data = read_validated(cfg(path), storage, "t")
        return {r["text"]: s for s in ("train", "validation") for r in data.split(s).take_all()}

    first = splits(tmp_path / "w1.jsonl")
    assert 0.15 < sum(v == "validation" for v in first.values()) / len(first) < 0.45
    assert splits(tmp_path / "w1.jsonl") == first
    # A later increment adds rows; every earlier row keeps its split.
    write_jsonl(tmp_path / "w2.jsonl", good_rows(100, 1000))
    both = splits(str(tmp_path / "w*.jsonl"))
    assert len(both) == 300 and all(both[t] == s for t, s in first.items())
    assert split_of("a", "pos", "lifelong", 0.3) == split_of("a", "pos", "lifelong", 0.3)


def test_tokenizing_for_both_tasks(ray_session, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from lifelong.models import train_tokenizer

    texts = [r["text"] for r in good_rows(200)]
    tok_dir = tmp_path / "tok"
    tok: PreTrainedTokenizerFast = train_tokenizer(iter(texts * 3), 300, tok_dir)
    write_jsonl(tmp_path / "d.jsonl", good_rows(200))
    data = read_validated(cfg(tmp_path / "d.jsonl"), Storage(str(tmp_path / "s")), "t")
    cls = tokenized(data.split(None), "sequence-classification", str(tok_dir), 16).take_all()
    assert len(cls) == 200 and all(len(r["input_ids"]) == 16 for r in cls)
    assert {int(r["labels"]) for r in cls} == {0, 1}
    lm = tokenized(data.split(None), "causal-lm", str(tok_dir), 16).take_all()
    total_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts)
    # Packed into full blocks: nothing padded, at most one partial block per batch lost.
    assert all(r["attention_mask"].sum() == 16 for r in lm)
    assert total_tokens - 16 < len(lm) * 16 <= total_tokens
