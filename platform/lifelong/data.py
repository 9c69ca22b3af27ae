"""Data in with Ray Data: find files, quarantine the unreadable, validate rows, split, tokenize.

    files ──inspect (Ray tasks)──▶ good files ──Ray Data read──▶ validate rows ──▶ split by hash
      └─ unreadable / wrong schema ──▶ <root>/quarantine/<area>/ (with the reason)

Rows are validated in `map_batches`, never on the driver: the driver only sees counts.
A row's split is a stable hash of its content, so it lands in the same split in every run
and in every later increment of the same data.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import posixpath
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import ray.data

from lifelong.config import DataConfig
from lifelong.errors import DataError
from lifelong.storage import Storage, filesystem_for, is_uri

FORMAT_BY_SUFFIX = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass
class FileReport:
    path: str
    format: str | None
    ok: bool
    rows: int = 0
    size: int = 0
    sha256: str = ""
    reason: str = ""


@dataclass
class DataReport:
    """What a read found: the files it used, the files it quarantined, the rows it dropped."""

    source: str
    files: list[FileReport]
    dropped: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # valid rows per split

    @property
    def used_files(self) -> list[FileReport]:
        return [f for f in self.files if f.ok]

    @property
    def quarantined(self) -> list[FileReport]:
        return [f for f in self.files if not f.ok]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "files": [asdict(f) for f in self.used_files],
            "quarantined": [{"path": f.path, "reason": f.reason} for f in self.quarantined],
            "dropped_rows": self.dropped,
            "rows": self.rows,
        }

    def summary(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()) if v) or "none"
        rows = ", ".join(f"{k}={v}" for k, v in sorted(self.rows.items()))
        return (
            f"{len(self.used_files)} file(s) read, {len(self.quarantined)} quarantined; "
            f"valid rows: {rows or 'none'}; dropped rows: {dropped}"
        )


# --- finding files ---------------------------------------------------------------------------
def list_data_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Expand a file, a directory (recursively) or a glob into data files, sorted."""
    fs, inner = filesystem_for(path)
    if any(ch in inner for ch in "*?["):
        parts = inner.split("/")
        first_wild = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        base = "/".join(parts[:first_wild]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, inner)]
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data path '{path}' does not exist (set data.path to a file, a directory or a glob)")
        if info.type == pafs.FileType.File:
            files = [inner]
        else:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File]
    # Hidden and marker files (.crc, _SUCCESS) are not data.
    files = sorted(f for f in files if not posixpath.basename(f).startswith((".", "_")))
    if not files:
        raise DataError(f"no data files match '{path}' (supported: .parquet, .jsonl, .json, .csv)")
    return fs, files


def detect_format(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    return FORMAT_BY_SUFFIX.get(posixpath.splitext(path)[1].lower())


def read_table(data: bytes, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(data))
    if fmt == "jsonl":
        return pajson.read_json(io.BytesIO(data))
    return pacsv.read_csv(io.BytesIO(data))


# SPREAD, not the default: inside a Tune trial the default would capture these tasks into the
# trial's own tiny placement group, where they do not fit.
@ray.remote(num_cpus=0.25, scheduling_strategy="SPREAD")
def inspect_file(fs: pafs.FileSystem, path: str, fmt: str, columns: list[str]) -> FileReport:
    """Parse one file fully (in a Ray task, not on the driver) and check its columns."""
    actual = detect_format(path, fmt)
    if actual is None:
        return FileReport(path, None, False, reason=f"unknown file type '{posixpath.splitext(path)[1]}' (set data.format)")
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
        table = read_table(data, actual)
    except Exception as e:  # any parse failure means the file is unreadable as that format
        return FileReport(path, actual, False, reason=f"unreadable as {actual}: {str(e).splitlines()[0][:300]}")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        return FileReport(
            path, actual, False, rows=table.num_rows, size=len(data),
            reason=f"wrong schema: missing column(s) {missing}; columns are {table.column_names}",
        )
    return FileReport(path, actual, True, rows=table.num_rows, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def quarantine(storage: Storage, area: str, fs: pafs.FileSystem, report: FileReport) -> str:
    """Copy a rejected file under <root>/quarantine/<area>/ beside a note of why (the source is left alone)."""
    name = posixpath.basename(report.path)
    dest = f"quarantine/{area}/{name}"
    storage.fs.create_dir(storage.path(f"quarantine/{area}"), recursive=True)
    pafs.copy_files(report.path, storage.path(dest), source_filesystem=fs, destination_filesystem=storage.fs)
    storage.write_json(
        f"{dest}.reason.json",
        {"source": report.path, "reason": report.reason, "quarantined_at": datetime.now(timezone.utc).isoformat()},
    )
    return dest


# --- rows ------------------------------------------------------------------------------------
def split_of(text: str, label: str, salt: str, validation_fraction: float) -> str:
    digest = hashlib.blake2b(f"{salt}\x00{text}\x00{label}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") / 2**64 < validation_fraction else "train"


def validate_rows(batch: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Normalise to (text, label, split, drop_reason); label is an index into cfg.labels or -1."""
    texts = batch[cfg.text_column]
    raw_labels = batch[cfg.label_column] if cfg.label_column else pd.Series([None] * len(batch), index=batch.index)
    label_ids = {name: i for i, name in enumerate(cfg.labels or [])}
    out_text, out_label, out_split, out_reason = [], [], [], []
    for text, label in zip(texts, raw_labels):
        # pd.isna covers None, NaN and pd.NA (what Arrow nulls become in pandas).
        text = "" if pd.isna(text) else str(text)
        label_str = None if pd.isna(label) else str(label).strip()
        reason, label_id = "", -1
        if not text.strip():
            reason = "empty_text"
        elif cfg.label_column:
            if not label_str:
                reason = "missing_label"
            elif label_str not in label_ids:
                reason = "unknown_label"
            else:
                label_id = label_ids[label_str]
        out_text.append(text)
        out_label.append(label_id)
        out_split.append(split_of(text, label_str or "", cfg.split_salt, cfg.validation_fraction) if not reason else "")
        out_reason.append(reason)
    return pd.DataFrame({"text": out_text, "label": np.asarray(out_label, dtype=np.int64), "split": out_split, "drop_reason": out_reason})


def _only(batch: pd.DataFrame, split: str | None) -> pd.DataFrame:
    keep = batch["drop_reason"] == ""
    if split is not None:
        keep &= batch["split"] == split
    return batch.loc[keep, ["text", "label"]]


def _count_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.groupby(["drop_reason", "split"]).size().reset_index(name="n")


# --- the pipeline ----------------------------------------------------------------------------
@dataclass
class ValidatedData:
    """Lazily read, validated rows plus the report of what was found."""

    rows: ray.data.Dataset  # columns: text, label, split, drop_reason
    report: DataReport

    def split(self, name: str | None) -> ray.data.Dataset:
        """Valid rows of one split ("train", "validation") or of all (None)."""
        return self.rows.map_batches(_only, fn_kwargs={"split": name}, batch_format="pandas")


def read_validated(cfg: DataConfig, storage: Storage, quarantine_area: str, path: str | None = None,
                   files: list[str] | None = None) -> ValidatedData:
    """Find (or take `files`: paths or URIs on one filesystem), inspect, quarantine, read and
    validate; fails only when nothing valid remains. The report's files follow `files`' order."""
    if files:
        source = path or "(the given files)"
        fs, _ = filesystem_for(files[0])
        files = [filesystem_for(f)[1] for f in files]
    else:
        source = path or cfg.path
        if not is_uri(source):
            source = str(Path(source).expanduser().resolve())
        fs, files = list_data_files(source)
    columns = [cfg.text_column] + ([cfg.label_column] if cfg.label_column else [])
    reports = ray.get([inspect_file.remote(fs, f, cfg.format, columns) for f in files])
    for bad in (r for r in reports if not r.ok):
        quarantine(storage, quarantine_area, fs, bad)
    report = DataReport(source=source, files=reports)
    good = report.used_files
    if not good:
        reasons = "\n".join(f"  - {r.path}: {r.reason}" for r in reports)
        raise DataError(f"no readable data in '{source}'; every file was quarantined:\n{reasons}")

    parts = []
    for fmt in ("parquet", "jsonl", "csv"):
        paths = [r.path for r in good if r.format == fmt]
        if not paths:
            continue
        if fmt == "parquet":
            ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, file_extensions=None)
        elif fmt == "jsonl":
            ds = ray.data.read_json(paths, filesystem=fs, file_extensions=None)  # pyarrow reads newline-delimited JSON
        else:
            ds = ray.data.read_csv(paths, filesystem=fs, file_extensions=None)
        parts.append(ds.map_batches(validate_rows, fn_kwargs={"cfg": cfg}, batch_format="pandas"))
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    # One counting pass: each batch reports its counts per (drop reason, split); only those
    # few numbers reach the driver (a groupby would shuffle every row).
    for batch in rows.map_batches(_count_rows, batch_format="pandas").iter_batches(batch_format="pandas", batch_size=None):
        for reason, split, n in zip(batch["drop_reason"], batch["split"], batch["n"]):
            bucket, key = (report.dropped, reason) if reason else (report.rows, split)
            bucket[key] = bucket.get(key, 0) + int(n)
    if not report.rows:
        raise DataError(f"no valid rows in '{source}': {report.summary()}")
    return ValidatedData(rows=rows, report=report)


# --- tokenization ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def cached_tokenizer(tokenizer_dir: str):
    # Loaded once per Ray worker process, then reused by every batch it tokenizes.
    from lifelong.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def tokenize_for_classification(batch: pd.DataFrame, tokenizer_dir: str, max_length: int) -> dict[str, np.ndarray]:
    tok = cached_tokenizer(tokenizer_dir)
    enc = tok(list(batch["text"]), truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "labels": batch["label"].to_numpy(dtype=np.int64),
    }


def tokenize_for_causal_lm(batch: pd.DataFrame, tokenizer_dir: str, max_length: int) -> dict[str, np.ndarray]:
    """Pack the batch's texts (each ended by EOS) into full blocks of max_length tokens."""
    tok = cached_tokenizer(tokenizer_dir)
    ids = tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for seq in ids for t in (*seq, tok.eos_token_id)), dtype=np.int64)
    n_blocks = len(stream) // max_length
    blocks = stream[: n_blocks * max_length].reshape(n_blocks, max_length)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()}


def tokenized(ds: ray.data.Dataset, task: str, tokenizer_dir: str, max_length: int) -> ray.data.Dataset:
    fn = tokenize_for_causal_lm if task == "causal-lm" else tokenize_for_classification
    # Large batches pack causal-LM text with little waste at block boundaries.
    return ds.map_batches(fn, fn_kwargs={"tokenizer_dir": tokenizer_dir, "max_length": max_length}, batch_format="pandas", batch_size=512)


def text_iterator(ds: ray.data.Dataset, limit: int):
    """Stream up to `limit` texts to the driver (for training a tokenizer), batch by batch."""
    seen = 0
    for batch in ds.iter_batches(batch_size=256, batch_format="pandas"):
        for text in batch["text"]:
            yield text
            seen += 1
            if seen >= limit:
                return
