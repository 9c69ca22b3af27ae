"""Data: quarantine of unreadable files, row drops counted per reason, a stable split, tokenizing."""

import json

import numpy as np
import pandas as pd
import pytest

from lifelong.config import DataConfig
from lifelong.data import TokenizerRef, read_validated, split_of, tokenized
from lifelong.errors import DataError
from lifelong.storage import Storage

LABELS = ["neg", "pos"]


def cfg(path, **kw):
    return DataConfig(path=str(path), label_column="label", labels=LABELS, validation_fraction=0.3, **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def good_rows(n, start=0):
    return [{"text": f"row number {i} is fine", "label": LABELS[i % 2]} for i in range(start, start + n)]


@pytest.mark.parametrize("in_process_mb", [16, 0], ids=["read-here", "ray-tasks"])
def test_bad_files_are_quarantined_and_bad_rows_counted(ray_session, tmp_path, in_process_mb):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(
        d / "a.jsonl",
        good_rows(20)
        + [
            {"text": "", "label": "pos"},
            {"text": "   ", "label": "neg"},
            {"text": None, "label": "neg"},
            {"text": "fine text", "label": "maybe"},
            {"text": "no label here", "label": None},
        ],
    )
    pd.DataFrame(good_rows(10, 100)).to_parquet(d / "b.parquet")
    pd.DataFrame(good_rows(10, 200)).to_csv(d / "c.csv", index=False)
    (d / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "broken.jsonl").write_text('{"text": "ok", "label": "pos"}\n{not json\n')  # one good line, one broken
    write_jsonl(d / "schema.jsonl", [{"body": "wrong column", "label": "pos"}])
    (d / "notes.txt").write_text("not a data file")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "junk.jsonl").write_bytes(bytes(range(256)) * 40)  # binary junk under a data name

    storage = Storage(str(tmp_path / "store"))
    data = read_validated(cfg(d, in_process_mb=in_process_mb), storage, quarantine_area="t")
    assert (data.table is not None, data.rows is not None) == ((True, False) if in_process_mb else (False, True))
    report = data.report
    assert sorted(f.path.rsplit("/", 1)[1] for f in report.used_files) == ["a.jsonl", "b.parquet", "broken.jsonl", "c.csv"]
    reasons = {f.path.rsplit("/", 1)[1]: f.reason for f in report.quarantined}
    assert set(reasons) == {"broken.parquet", "schema.jsonl", "notes.txt", "empty.jsonl", "junk.jsonl"}
    assert "unreadable as parquet" in reasons["broken.parquet"]
    assert "unreadable as jsonl" in reasons["junk.jsonl"]
    assert reasons["empty.jsonl"] == "empty file (0 bytes)"
    assert "missing column(s) ['text']" in reasons["schema.jsonl"]
    assert "unknown file type" in reasons["notes.txt"]
    assert report.dropped == {"empty_text": 3, "unknown_label": 1, "missing_label": 1, "malformed_line": 1}
    assert report.rows["train"] + report.rows["validation"] == 41
    # Quarantined copies sit beside their reasons; the source files are untouched.
    copies = storage.listdir("quarantine/t")
    broken = next(n for n in copies if n.endswith("-broken.parquet"))
    assert "unreadable" in storage.read_json(f"quarantine/t/{broken}.reason.json")["reason"]
    assert (d / "broken.parquet").exists()
    rows = data.split(None).take_all()
    assert len(rows) == 41 and {r["label"] for r in rows} == {0, 1}


def test_rows_of_every_wrong_shape_are_dropped_by_reason_not_a_traceback(ray_session, tmp_path):
    """What passed a file-level check and then crashed the read (or trained as garbage): invalid
    UTF-8 inside a JSON string, a lone surrogate, list- and object-valued text, non-scalar and
    wrong-typed labels, numbers where text belongs, a CSV cell that is not UTF-8, one very long line."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "utf8.jsonl").write_bytes(b'{"text": "fine words", "label": "pos"}\n{"text": "bad \xff\xfe byte", "label": "neg"}\n')
    (d / "surrogate.jsonl").write_bytes(b'{"text": "fine", "label": "neg"}\n{"text": "x \\ud800 y", "label": "pos"}\n')
    write_jsonl(
        d / "listtext.jsonl",
        [
            {"text": ["a", "list"], "label": "pos"},
            {"text": {"an": "object"}, "label": "neg"},
            {"text": 42, "label": "neg"},
            {"text": "plain", "label": "neg"},
        ],
    )
    write_jsonl(
        d / "labels.jsonl",
        [
            {"text": "one", "label": ["pos"]},
            {"text": "two", "label": {"v": 1}},
            {"text": "three", "label": True},
            {"text": "four", "label": 0.5},
            {"text": "five", "label": "pos"},
        ],
    )
    (d / "cells.csv").write_bytes(b"text,label\nok text,pos\nbad \xff cell,neg\n123,neg\n")
    write_jsonl(d / "long.jsonl", [{"text": "word " * 400_000, "label": "pos"}, {"text": "short", "label": "neg"}])
    pd.DataFrame({"text": [["a"], ["b"]], "label": ["pos", "neg"]}).to_parquet(d / "listcol.parquet")

    data = read_validated(cfg(d), Storage(str(tmp_path / "store")), quarantine_area="t")
    per_file = {f.path.rsplit("/", 1)[1]: (f.rows, f.dropped) for f in data.report.files}
    assert per_file["utf8.jsonl"] == (1, {"invalid_utf8": 1})
    assert per_file["surrogate.jsonl"] == (1, {"invalid_utf8": 1})
    assert per_file["listtext.jsonl"] == (1, {"wrong_text_type": 3})
    assert per_file["labels.jsonl"] == (1, {"wrong_label_type": 4})
    assert per_file["cells.csv"] == (2, {"invalid_utf8": 1})  # "123" is text in a CSV
    assert per_file["long.jsonl"] == (2, {})
    assert per_file["listcol.parquet"] == (0, {"wrong_text_type": 2})
    texts = {r["text"] for r in data.split(None).take_all()}
    assert {"fine words", "fine", "plain", "five", "ok text", "123", "short"} <= texts and len(texts) == 8
    assert not any("\ufffd" in t or t.startswith("b'") for t in texts)


def test_quarantined_files_of_the_same_name_in_different_folders_keep_separate_copies(ray_session, tmp_path):
    for folder, body in (("a", b"PAR1 not parquet A"), ("b", b"PAR1 not parquet B")):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "part-0.parquet").write_bytes(body)
    write_jsonl(tmp_path / "in" / "good.jsonl", good_rows(10))
    storage = Storage(str(tmp_path / "store"))
    read_validated(cfg(tmp_path / "in"), storage, quarantine_area="t")
    copies = sorted(n for n in storage.listdir("quarantine/t") if n.endswith("part-0.parquet"))
    assert len(copies) == 2 and {storage.read_bytes(f"quarantine/t/{n}") for n in copies} == {b"PAR1 not parquet A", b"PAR1 not parquet B"}
    sources = {storage.read_json(f"quarantine/t/{n}.reason.json")["source"] for n in copies}
    assert sources == {str(tmp_path / "in" / "a" / "part-0.parquet"), str(tmp_path / "in" / "b" / "part-0.parquet")}


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
    cls = tokenized(data.split(None), "sequence-classification", TokenizerRef(str(tok_dir)), 16).take_all()
    assert len(cls) == 200 and all(len(r["input_ids"]) == 16 for r in cls)
    assert {int(r["labels"]) for r in cls} == {0, 1}
    lm = tokenized(data.split(None), "causal-lm", TokenizerRef(str(tok_dir)), 16).take_all()
    total_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in texts)
    # Packed into full blocks: nothing padded, at most one partial block per batch lost.
    assert all(r["attention_mask"].sum() == 16 for r in lm)
    assert total_tokens - 16 < len(lm) * 16 <= total_tokens
    # Rows read here (a table in the driver) are tokenized here, batch by batch as Ray Data does:
    # the same examples, for both tasks.
    table = data.split_rows(None)
    assert table.num_rows == 200
    for task, by_ray in (("sequence-classification", cls), ("causal-lm", lm)):
        here = tokenized(table, task, TokenizerRef(str(tok_dir)), 16).take_all()
        assert sorted(map(example, here)) == sorted(map(example, by_ray))


def example(row: dict) -> str:
    return str({k: np.asarray(v).tolist() for k, v in row.items()})


def bert_style_tokenizer(out_dir):
    """A WordPiece tokenizer saved as HF saves a BERT one (its class named in tokenizer_config,
    [CLS]/[SEP] added by tokenizer.json's post-processor, a [PAD] of its own)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator([r["text"] for r in good_rows(200)], trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]").save_pretrained(
        out_dir
    )
    return out_dir


def test_data_tasks_tokenize_as_the_model_side_does_without_importing_torch(tmp_path):
    """Ray Data's workers load the tokenizer through HF's fast class alone (AutoTokenizer would
    import torch: seconds in every fresh worker); the ids, masks and pad token are the same."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa

    from lifelong.models import load_tokenizer, train_tokenizer
    from lifelong.tasks.causal_lm import tokenize as tokenize_for_causal_lm
    from lifelong.tasks.text_classification import tokenize as tokenize_for_classification

    gpt2_dir = tmp_path / "gpt2"
    train_tokenizer(iter([r["text"] for r in good_rows(200)] * 3), 300, gpt2_dir)
    bert_dir = bert_style_tokenizer(tmp_path / "bert")
    texts = ["Row number 7 IS fine", "row " * 40, "", "unseen wordsmithery ünïcode"]
    batch = pa.table({"text": texts, "label": [0, 1, 0, 1]})
    for directory in (gpt2_dir, bert_dir):
        model_side = load_tokenizer(directory)
        expected = model_side(texts, truncation=True, max_length=12, padding="max_length", return_tensors="np")
        got = tokenize_for_classification(batch, str(directory), 12)
        assert np.array_equal(got["input_ids"], expected["input_ids"]) and np.array_equal(got["attention_mask"], expected["attention_mask"])
        assert got["labels"].tolist() == [0, 1, 0, 1]
    assert load_tokenizer(gpt2_dir).pad_token == "<|endoftext|>"  # GPT-2 style: EOS pads
    packed = tokenize_for_causal_lm(batch, str(gpt2_dir), 4)
    assert packed["input_ids"].shape[1] == 4 and packed["attention_mask"].all()

    probe = (  # as a Ray Data task does: the task's tokenize, through its family module
        "import sys; import pyarrow as pa; from lifelong.data import cached_tokenizer, TokenizerRef; from lifelong.tasks import task; "
        f"ref = TokenizerRef({str(bert_dir)!r}); "
        "out = task('sequence-classification').tokenize(pa.table({'text': ['a b'], 'label': [1]}), ref, 8); "
        "print(cached_tokenizer(ref).pad_token, out['input_ids'].shape[1], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[PAD]", "8", "False"]


def test_one_large_file_is_spread_over_blocks_for_every_cpu(ray_session, tmp_path):
    import ray

    from lifelong.data import MIN_BLOCK_ROWS, block_count

    cpus = int(ray.cluster_resources()["CPU"])
    write_jsonl(tmp_path / "big.jsonl", good_rows(2 * MIN_BLOCK_ROWS))
    # Read by Ray tasks (as data above data.in_process_mb is) however small the test's file is.
    data = read_validated(cfg(tmp_path / "big.jsonl", in_process_mb=0), Storage(str(tmp_path / "s")), "t").rows.materialize()
    assert data.num_blocks() == min(2 * cpus, 2) == block_count(1, 2 * MIN_BLOCK_ROWS, cpus)
    assert data.count() == 2 * MIN_BLOCK_ROWS and len({r["text"] for r in data.take_all()}) == 2 * MIN_BLOCK_ROWS
    # Many files, or few rows, keep one block per file.
    assert block_count(40, 10**6, cpus) == 40 and block_count(1, MIN_BLOCK_ROWS - 1, cpus) == 1


def test_a_report_on_the_console_counts_its_files_and_the_json_lists_them():
    from lifelong.data import DataReport, FileReport

    files = [FileReport(f"/d/{i}.png", "image", "ok", rows=1, size=10, sha256=str(i)) for i in range(3)]
    report = DataReport("/d", [*files, FileReport("/d/x.png", "image", "bad", reason="empty file (0 bytes)")], {}, {"train": 3})
    listed, counted = report.to_dict(), report.to_dict(per_file=False)
    assert [f["path"] for f in listed["files"]] == ["/d/0.png", "/d/1.png", "/d/2.png"] and counted["files"] == 3
    assert counted["quarantined"] == listed["quarantined"] == [{"path": "/d/x.png", "reason": "empty file (0 bytes)"}]


def test_a_dataset_of_tables_read_here_starts_no_ray_task(ray_session, monkeypatch):
    """Rows read, tokenized or scored in the driver (data.in_process_mb) become a dataset without
    the remote task per table that ray.data.from_arrow runs (each a worker process to start on a
    fresh Ray). The witness is Ray Data's own maker of remote functions: from_arrow, just after,
    asks it for its task."""
    import pyarrow as pa
    import ray.data.read_api

    from lifelong.data import dataset_of

    remote, made = ray.data.read_api.cached_remote_fn, []
    monkeypatch.setattr(ray.data.read_api, "cached_remote_fn", lambda fn, **kw: made.append(fn.__name__) or remote(fn, **kw))
    tables = [pa.table({"text": [f"row {i}.{j}" for j in range(5)], "label": [j % 2 for j in range(5)]}) for i in range(3)]
    ours = dataset_of(tables)
    assert ours.count() == 15 and ours.num_blocks() == 3 and ours.schema().names == ["text", "label"]
    assert sorted(r["text"] for r in ours.take_all()) == sorted(t for table in tables for t in table.column("text").to_pylist())
    assert made == []
    assert ray.data.from_arrow(tables).take_all() == ours.take_all()  # the witness
    assert made == ["get_table_block_metadata_schema"]
