"""Data in: find files, read each exactly once, validate its rows, split, tokenize.

    files ──read_files (Ray tasks: copy + hash + parse + validate)──▶ valid rows (object store)
      │                                                               └─▶ Ray Data ─▶ tokenize
      └─ unparseable / wrong schema / no rows ──▶ <root>/quarantine/<area>/ (with the reason)

Each file is copied once from wherever it lives (streamed, hashed on the way) and parsed from
that copy, so the rows trained on are exactly the bytes whose SHA-256 the card and the ledger
record, even when the source changes meanwhile. Parsing and validation happen in the same task
(`parse_file`): a bad row (invalid UTF-8, a list where text belongs, an unknown label, ...) is
dropped and counted by reason, a file that cannot be parsed at all is quarantined, and nothing
reaches the driver but counts. A row's split is a stable hash of its content, so it lands in
the same split in every run and in every later increment of the same data.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
import ray.data

from lifelong.config import DataConfig
from lifelong.errors import DataError, first_line
from lifelong.runtime import gather
from lifelong.storage import Storage, filesystem_for, is_uri, local_cache_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
FORMAT_BY_SUFFIX = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    **dict.fromkeys(IMAGE_SUFFIXES, "image"),
}
SUPPORTED = ", ".join(FORMAT_BY_SUFFIX)
# Image modes a model reads (converted to RGB); others (CMYK, 32-bit integer or float
# pixels, ...) are refused with their mode named rather than converted by a guess.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
# Part of a validation's fingerprint (continual ledger): bump when the rules below change.
RULES_VERSION = 3
# Files up to this size are parsed from memory; larger ones from a local copy on disk.
IN_MEMORY_BYTES = 64 << 20
TRANSIENT_RETRIES = 3


@dataclass
class FileReport:
    """What reading one file found. `state`: ok | bad (quarantine: unparseable, wrong schema, no
    rows) | missing (gone before it could be read) | unreadable (I/O kept failing: try later) |
    changing (modified while it was read: try later)."""

    path: str
    format: str | None
    state: str
    rows: int = 0  # valid rows
    size: int = 0
    sha256: str = ""
    reason: str = ""
    read: int = 0  # rows parsed, valid or not
    dropped: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)  # valid rows per split
    mtime_ns: int | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


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

    def to_dict(self, per_file: bool = True) -> dict:
        """`per_file`: every file used with its hash and counts (else only how many: an image folder has thousands)."""
        files = [{k: v for k, v in asdict(f).items() if k not in ("state", "reason", "mtime_ns")} for f in self.used_files]
        return {
            "source": self.source,
            "files": files if per_file else len(files),
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
def detect_format(path: str, fmt: str = "auto") -> str | None:
    """The one rule for what a file is (data.path and landing zones alike): data.format when set,
    else the suffix, in any case (.parquet/.pq, .jsonl/.json/.ndjson, .csv)."""
    if fmt != "auto":
        return fmt
    return FORMAT_BY_SUFFIX.get(posixpath.splitext(path)[1].lower())


def is_data_candidate(path: str) -> bool:
    # Hidden and marker files (.crc, _SUCCESS, .tmp-…) are not data.
    return not posixpath.basename(path).startswith((".", "_"))


def list_files(fs: pafs.FileSystem, base: str, exclude: tuple[str, ...] = ()) -> list[pafs.FileInfo]:
    """Every candidate file under `base` (recursively), sorted by path, except what lies under
    `exclude` (e.g. a storage root placed inside a data directory: its own files are not data)."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    excluded = tuple(e.rstrip("/") + "/" for e in exclude)
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and is_data_candidate(i.path) and not i.path.startswith(excluded)),
        key=lambda i: i.path,
    )


def list_data_files(path: str, exclude: tuple[str, ...] = ()) -> tuple[pafs.FileSystem, list[str]]:
    """Expand a file, a directory (recursively) or a glob into data files, sorted."""
    fs, infos = list_data_infos(path, exclude)
    return fs, [i.path for i in infos]


def list_data_infos(path: str, exclude: tuple[str, ...] = ()) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """`list_data_files` with each file's listing (its size) as the filesystem gave it."""
    import fnmatch

    fs, inner = filesystem_for(path)
    if any(ch in inner for ch in "*?["):
        parts = inner.split("/")
        first_wild = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        base = "/".join(parts[:first_wild]) or "/"
        infos = [i for i in list_files(fs, base, exclude) if fnmatch.fnmatch(i.path, inner)]
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data path '{path}' does not exist (set data.path to a file, a directory or a glob)")
        infos = [info] if info.type == pafs.FileType.File else list_files(fs, inner, exclude)
    if not infos:
        raise DataError(f"no data files match '{path}' (supported: {SUPPORTED})")
    return fs, infos


def display_uri(fs: pafs.FileSystem, path: str) -> str:
    """How a file inside `fs` is named to people and in records: a local path, or scheme://path
    (built from the filesystem, never by pasting strings onto a URI that may carry a query)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


# --- one copy of a file, hashed on the way -----------------------------------------------------
class Fetched:
    """The bytes of one file as read once: in memory when small, else a local temporary copy."""

    def __init__(self, data: bytes | None, local: str | None, size: int, sha256: str, mtime_ns: int | None = None):
        self.data, self.local, self.size, self.sha256, self.mtime_ns = data, local, size, sha256, mtime_ns

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.local, "rb")

    def tail(self, offset: int, keep_first_line: bool) -> Fetched:
        """The bytes after `offset` (what was appended), led by the first line when asked (a CSV header)."""
        with self.open() as f:
            head = f.readline() if keep_first_line else b""
            f.seek(offset)
            rest = f.read()
        return Fetched(head + rest, None, len(head) + len(rest), self.sha256, self.mtime_ns)

    def close(self) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local)


class SourceGone(Exception):
    pass


class SourceUnstable(Exception):
    pass


def fetch(fs: pafs.FileSystem, path: str, prefix_size: int | None = None) -> tuple[Fetched, str | None]:
    """Copy `path` once (streamed, hashed on the way). Returns the copy and, when `prefix_size`
    is given, the SHA-256 of its first `prefix_size` bytes (to recognise an append).

    Raises SourceGone when the file disappeared, SourceUnstable when it changed while being read
    (size or modification time moved), OSError when reading kept failing (retried with backoff:
    object stores throttle, connections reset, network mounts hiccup).
    """
    delay = 0.5
    for attempt in range(TRANSIENT_RETRIES):
        try:
            return _fetch_once(fs, path, prefix_size)
        except FileNotFoundError:
            raise SourceGone(path) from None
        except (SourceUnstable, SourceGone):
            raise
        except OSError:
            if attempt == TRANSIENT_RETRIES - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _fetch_once(fs: pafs.FileSystem, path: str, prefix_size: int | None) -> tuple[Fetched, str | None]:
    before = fs.get_file_info(path)
    if before.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    digest, prefix_digest, size = hashlib.sha256(), None, 0
    buffer, local, sink = None, None, None
    try:
        with fs.open_input_stream(path) as src:
            if before.size is not None and before.size <= IN_MEMORY_BYTES:
                sink = buffer = io.BytesIO()
            else:
                fd, local = tempfile.mkstemp(prefix="lifelong-fetch-")
                sink = os.fdopen(fd, "wb")
            while chunk := src.read(1 << 20):
                if prefix_size is not None and prefix_digest is None and size + len(chunk) >= prefix_size:
                    cut = prefix_size - size
                    digest.update(chunk[:cut])
                    prefix_digest = digest.copy().hexdigest()
                    digest.update(chunk[cut:])
                else:
                    digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
        if local:
            sink.close()
        after = fs.get_file_info(path)
        if after.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if (after.size, after.mtime_ns) != (before.size, before.mtime_ns) or after.size != size:
            raise SourceUnstable(f"{path} changed while it was read ({before.size} → {after.size} bytes)")
    except BaseException:
        if local:
            with contextlib.suppress(Exception):
                sink.close()
            os.unlink(local)
        raise
    if prefix_size is not None and prefix_digest is None and size == prefix_size:
        prefix_digest = digest.hexdigest()
    return Fetched(buffer.getvalue() if buffer is not None else None, local, size, digest.hexdigest(), after.mtime_ns), prefix_digest


# --- parsing and validating one file -------------------------------------------------------------
@dataclass
class ParsedFile:
    """One file's rows by the rules of a DataConfig. `rows`: the valid ones (text, label, split);
    `reason` set: the file as a whole is unusable (quarantine it)."""

    rows: pa.Table | None
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    # Labels not in data.labels, in order of appearance, when the config grows its label set
    # (`DataConfig.grow_labels`): their rows are dropped as new_label until the set holds them.
    new_labels: list[str] = field(default_factory=list)


ROWS_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64()), ("split", pa.string())])
# Instruction rows (data.response_column) carry their response after those columns.
RESPONSE = "response"
IMAGE_ROWS_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("split", pa.string())])


def parse_file(source: Fetched, fmt: str | None, cfg: DataConfig, name: str = "", images: ImageReader | None = None) -> ParsedFile:
    """Parse and validate one file (bytes already read): the one place where rows are judged.

    Row reasons: empty_text, wrong_text_type (a list, object or number where text belongs),
    invalid_utf8 (bytes that are not UTF-8, lone surrogates), malformed_line (a JSON line or CSV
    row that does not parse), missing_label, wrong_label_type (lists, objects, booleans,
    fractional numbers), unknown_label (not one of data.labels), new_label (not yet one of them,
    under a config that grows its label set: `ParsedFile.new_labels` names them); for instruction
    rows (data.response_column), empty_response and wrong_response_type too.
    `images` reads the image files that a table's image column names by path (`image_reader`).
    """
    if fmt is None:
        return ParsedFile(None, reason=f"unknown file type '{posixpath.splitext(name)[1]}' (supported: {SUPPORTED}; or set data.format)")
    if source.size == 0:
        return ParsedFile(None, reason="empty file (0 bytes)")
    if fmt == "image":
        return _parse_image_file(source, cfg, name)
    if cfg.content == "image" and cfg.labels and not cfg.label_column:
        return ParsedFile(None, reason="a table of images needs data.label_column (only image files are labelled by their folder)")
    columns = [cfg.content_column] + [c for c in (cfg.response_column, cfg.label_column) if c]
    dropped: Counter = Counter()
    try:
        if fmt == "parquet":
            table = _read_parquet(source, columns)
        elif fmt == "csv":
            table = _read_csv(source, columns, dropped)
        else:
            table = _read_jsonl(source, columns, dropped)
    except _SchemaError as e:
        return ParsedFile(None, reason=f"wrong schema: {e}")
    except Exception as e:  # any parse failure means the file is unreadable as that format
        return ParsedFile(None, reason=f"unreadable as {fmt}: {first_line(e)}")
    if table.num_rows == 0 and not dropped:
        return ParsedFile(None, reason="holds no rows")
    unparsed = sum(dropped.values())  # lines that never became rows
    if cfg.content == "image":
        rows, row_drops, new = validate_image_table(table, cfg, images)
    else:
        rows, row_drops, new = validate_table(table, cfg)
    dropped.update(row_drops)
    return ParsedFile(rows, read=table.num_rows + unparsed, dropped=dict(dropped), new_labels=new)


class _SchemaError(Exception):
    pass


def _check_columns(names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise _SchemaError(f"missing column(s) {missing}; columns are {names}")


def _read_parquet(source: Fetched, columns: list[str]) -> pa.Table:
    with source.open() as f:
        pf = pq.ParquetFile(f)
        _check_columns(pf.schema_arrow.names, columns)
        return pf.read(columns=columns)


def _block_size(size: int) -> int:
    # One block for files up to 256 MB: a JSON line or CSV row never straddles two blocks.
    return int(min(max(size + 1, 1 << 20), 256 << 20))


def _read_csv(source: Fetched, columns: list[str], dropped: Counter) -> pa.Table:
    def skip(row) -> str:
        dropped["malformed_line"] += 1
        return "skip"

    with source.open() as f:
        table = pacsv.read_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=_block_size(source.size)),
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
            # Text stays text ("123" is a sentence too); UTF-8 is checked per row below.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, check_utf8=False),
        )
    _check_columns(table.column_names, columns)
    return table.select(columns)


def _read_jsonl(source: Fetched, columns: list[str], dropped: Counter) -> pa.Table:
    try:
        with source.open() as f:
            table = pajson.read_json(f, read_options=pajson.ReadOptions(block_size=_block_size(source.size)))
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
        # One bad line (invalid UTF-8, a lone surrogate, a type that changes from row to row, a
        # broken line) fails Arrow's reader for the whole file: judge it line by line instead.
        return _read_jsonl_lines(source, columns, dropped)
    _check_columns(table.column_names, columns)
    return table.select(columns)


def _read_jsonl_lines(source: Fetched, columns: list[str], dropped: Counter) -> pa.Table:
    values = {c: [] for c in columns}
    parsed, first_error = 0, None
    with source.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                dropped["invalid_utf8"] += 1
                first_error = first_error or f"line {number}: not UTF-8"
                continue
            except json.JSONDecodeError as e:
                dropped["malformed_line"] += 1
                first_error = first_error or f"line {number}: {e}"
                continue
            if not isinstance(obj, dict):
                dropped["malformed_line"] += 1
                first_error = first_error or f"line {number}: a JSON {type(obj).__name__}, not an object"
                continue
            parsed += 1
            for c in columns:
                values[c].append(obj.get(c))
    if not parsed:
        raise ValueError(first_error or "no JSON object in the file")
    if all(v is None for v in values[columns[0]]):
        raise _SchemaError(f"no line has the column '{columns[0]}'")
    # Mixed Python values: each column becomes an Arrow array of what it can hold, and
    # `validate_table` judges the rows (wrong types become wrong_text_type / wrong_label_type).
    return pa.table({c: _python_column(v) for c, v in values.items()})


def _python_column(values: list) -> pa.Array:
    """Arbitrary JSON values → an Arrow string column where they are strings (or integer labels);
    anything else becomes a marker the validator recognises as the wrong type."""
    out = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(_INT_PREFIX + str(v))
        elif isinstance(v, float) and v.is_integer():
            out.append(_INT_PREFIX + str(int(v)))
        else:
            out.append(_WRONG_TYPE)
    return pa.array([_encodable(v) for v in out], pa.string())


# Markers that cannot occur in real UTF-8 text (they are lone surrogates, which Arrow refuses in
# data, so they are swapped for NUL-led tags that no valid row carries).
_INT_PREFIX = "\x00int:"
_WRONG_TYPE = "\x00wrong-type"
_BAD_UTF8 = "\x00bad-utf8"


def _encodable(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        v.encode("utf-8")  # a lone surrogate (JSON "\ud800") cannot be UTF-8
    except UnicodeEncodeError:
        return _BAD_UTF8
    return v


def _strings(col: pa.ChunkedArray | pa.Array, reasons: np.ndarray, bad_type: str) -> pa.Array:
    """A column as UTF-8 strings; rows that cannot be get their reason (first reason wins)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_large_string(t):
        arr = arr.cast(pa.string())
        t = arr.type
    if pa.types.is_string(t):
        try:
            arr.validate(full=True)  # invalid UTF-8 (CSV read unchecked, Parquet from a lax writer)
        except pa.ArrowInvalid:
            arr = _decode_each(arr.cast(pa.binary()).to_pylist(), reasons)
        return _markers(arr, reasons, bad_type)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return _decode_each(arr.to_pylist(), reasons)
    if pa.types.is_integer(t):
        return pc.binary_join_element_wise(_INT_PREFIX, arr.cast(pa.string()), "")
    if pa.types.is_floating(t):
        integral = pc.and_(pc.is_finite(arr), pc.equal(pc.floor(arr), arr)).fill_null(True)
        _mark(reasons, pc.and_(pc.invert(integral), pc.is_valid(arr)), bad_type)
        as_int = pc.if_else(integral, arr, None).cast(pa.int64())
        return pc.binary_join_element_wise(_INT_PREFIX, as_int.cast(pa.string()), "")
    # Lists, structs, booleans, ...: not text, not a label.
    _mark(reasons, pc.is_valid(arr), bad_type)
    return pa.nulls(len(arr), pa.string())


def _decode_each(values: list, reasons: np.ndarray) -> pa.Array:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
            if not reasons[i]:
                reasons[i] = "invalid_utf8"
    return pa.array(out, pa.string())


def _markers(arr: pa.Array, reasons: np.ndarray, bad_type: str) -> pa.Array:
    """Resolve the tags `_python_column` left: wrong types and bad UTF-8 become reasons."""
    if not len(arr) or not pc.any(pc.starts_with(arr.fill_null(""), "\x00")).as_py():
        return arr
    _mark(reasons, pc.equal(arr, _WRONG_TYPE), bad_type)
    _mark(reasons, pc.equal(arr, _BAD_UTF8), "invalid_utf8")
    arr = pc.if_else(pc.or_(pc.equal(arr, _WRONG_TYPE), pc.equal(arr, _BAD_UTF8)), None, arr)
    return arr


def _mark(reasons: np.ndarray, mask: pa.Array, reason: str) -> None:
    m = mask.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    reasons[m & (reasons == "")] = reason


def validate_table(table: pa.Table, cfg: DataConfig) -> tuple[pa.Table, dict[str, int], list[str]]:
    """Judge every row: the valid ones as (text, label, split), the others counted by reason, and
    the new labels seen (a config that grows its label set). label is the index into data.labels
    (-1 without a label column)."""
    n = table.num_rows
    reasons = np.full(n, "", dtype=object)
    text = _text(table.column(cfg.content_column), reasons, "text")
    # Instruction rows: the prompt is the row's text, its response a second text (response column).
    response = _text(table.column(cfg.response_column), reasons, "response") if cfg.response_column else None
    label, index = _labels(table, cfg, reasons)
    keep = pa.array(reasons == "")
    texts = text.filter(keep)
    names = label.filter(keep).fill_null("").to_pylist()
    hashed = texts.to_pylist()
    if response is not None:  # a prompt with another response is another row
        hashed = [f"{t}\x00{r}" for t, r in zip(hashed, response.filter(keep).to_pylist())]
    split = [split_of(t, lab, cfg.split_salt, cfg.validation_fraction) for t, lab in zip(hashed, names)]
    rows = pa.Table.from_arrays([texts, index.filter(keep).cast(pa.int64()), pa.array(split, pa.string())], schema=ROWS_SCHEMA)
    if response is not None:
        rows = rows.append_column(RESPONSE, response.filter(keep).cast(pa.string()))
    dropped = Counter(r for r in reasons if r)
    return rows, dict(dropped), _new_labels(label, reasons)


def _text(column: pa.ChunkedArray, reasons: np.ndarray, what: str) -> pa.Array:
    """A column of text judged: wrong_<what>_type (a number, list, object) and empty_<what> marked."""
    text = _strings(column, reasons, f"wrong_{what}_type")
    if pa.types.is_string(text.type) and pc.any(pc.starts_with(text.fill_null(""), _INT_PREFIX)).as_py():
        _mark(reasons, pc.starts_with(text.fill_null(""), _INT_PREFIX), f"wrong_{what}_type")  # a number is not text
    _mark(reasons, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text.fill_null(""))), 0), f"empty_{what}")
    return text


# --- images ---------------------------------------------------------------------------------
def image_problem(data: bytes | None) -> str:
    """Why these bytes are not an image a model can read ("" when they are): decoded in full, so
    a truncated file is caught here and not in the middle of training."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            image.load()
    except UnidentifiedImageError:
        return "not_an_image"
    except Image.DecompressionBombError:
        return "image_too_large"
    except (OSError, SyntaxError, ValueError) as e:
        return "truncated_image" if "truncated" in str(e).lower() else "undecodable_image"
    return "" if mode in IMAGE_MODES else f"unsupported_mode_{mode}"


IMAGE_REASONS = {
    "empty_image": "an empty image (0 bytes)",
    "not_an_image": "not an image (no image format recognises its bytes)",
    "truncated_image": "a truncated image (its data ends before the picture does)",
    "undecodable_image": "an image that cannot be decoded",
    "image_too_large": "an image above Pillow's decompression-bomb limit of pixels",
}


def image_reason(problem: str) -> str:
    if problem.startswith("unsupported_mode_"):
        mode = problem.removeprefix("unsupported_mode_")
        return f"unsupported image mode {mode} (supported: {', '.join(IMAGE_MODES)})"
    return IMAGE_REASONS[problem]


def _parse_image_file(source: Fetched, cfg: DataConfig, name: str) -> ParsedFile:
    """One image file: one row, labelled by its folder's name (the image-folder layout)."""
    if cfg.content != "image":
        return ParsedFile(None, reason="an image file, but model.task reads text")
    with source.open() as f:
        data = f.read()
    problem = image_problem(data)
    if problem:
        return ParsedFile(None, read=1, reason=image_reason(problem))
    folder = posixpath.basename(posixpath.dirname(name))
    labels = cfg.labels
    if labels is None:  # unlabelled images (self-supervised pretraining): folders are only folders
        split = split_of(hashlib.sha256(data).hexdigest(), "", cfg.split_salt, cfg.validation_fraction)
        table = [pa.array([data], pa.binary()), pa.array([-1], pa.int64()), pa.array([split])]
        return ParsedFile(pa.Table.from_arrays(table, schema=IMAGE_ROWS_SCHEMA), read=1)
    if folder not in labels and cfg.grow_labels:
        return ParsedFile(IMAGE_ROWS_SCHEMA.empty_table(), read=1, dropped={"new_label": 1}, new_labels=[folder])
    if folder not in labels:
        return ParsedFile(
            None, read=1, reason=f"its folder '{folder}' is not one of data.labels {labels} (images are labelled by their folder)"
        )
    label = labels.index(folder)
    split = split_of(hashlib.sha256(data).hexdigest(), folder, cfg.split_salt, cfg.validation_fraction)
    rows = pa.Table.from_arrays([pa.array([data], pa.binary()), pa.array([label], pa.int64()), pa.array([split])], schema=IMAGE_ROWS_SCHEMA)
    return ParsedFile(rows, read=1)


ImageReader = Callable[[str], tuple[bytes | None, str]]  # an image path -> (its bytes, or None and why)


def image_reader(fs: pafs.FileSystem, table_path: str, image_root: str | None = None) -> ImageReader:
    """How a table file at `table_path` (on `fs`) reads the images its rows name: a relative path
    from `image_root` (data.image_root; default the table's folder), never above it
    (image_path_outside); an absolute path on the same filesystem; or a URI. Returns
    (bytes, "") or (None, missing_image_file | unreadable_image_file)."""
    if image_root:
        fs, base = filesystem_for(image_root if is_uri(image_root) else str(Path(image_root).expanduser().resolve()))
    else:
        base = posixpath.dirname(table_path)

    def read(ref: str) -> tuple[bytes | None, str]:
        ref_fs, path = fs, ref
        if is_uri(ref):
            ref_fs, path = filesystem_for(ref)
        elif not ref.startswith("/"):
            path = posixpath.normpath(posixpath.join(base, ref))
            if base and not path.startswith(base.rstrip("/") + "/"):
                return None, "image_path_outside"
        try:
            with ref_fs.open_input_stream(path) as f:
                return f.read(), ""
        except FileNotFoundError:
            return None, "missing_image_file"
        except OSError:
            return None, "unreadable_image_file"

    return read


def validate_image_table(
    table: pa.Table, cfg: DataConfig, read_image: ImageReader | None = None
) -> tuple[pa.Table, dict[str, int], list[str]]:
    """Image rows of a table file: encoded bytes (binary, or base64 text) or the path of an image
    file (text with a '.', which base64 never holds: read by `read_image`, relative to the table's
    folder), and a label. Rows whose bytes are not a readable image are dropped by reason
    (empty_image, not_an_image, truncated_image, unsupported_mode_<MODE>, missing_image_file,
    image_path_outside, ...), as bad text rows are. The rows hold the image's bytes as read."""
    import base64
    import binascii

    n = table.num_rows
    reasons = np.full(n, "", dtype=object)
    column = table.column(cfg.image_column).combine_chunks()
    images: list[bytes | None] = []
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        images = column.to_pylist()
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        for i, value in enumerate(column.to_pylist()):
            if value and "." in value:  # a path
                data, reasons[i] = read_image(value) if read_image else (None, "unreadable_image_file")
                images.append(data)
                continue
            try:
                images.append(base64.b64decode(value, validate=True) if value else None)
            except (binascii.Error, ValueError):
                images.append(None)
                reasons[i] = "invalid_base64"
    else:
        images = [None] * n
        _mark(reasons, column.is_valid(), "wrong_image_type")
    for i, data in enumerate(images):
        if not reasons[i]:
            reasons[i] = image_problem(data)
    label, index = _labels(table, cfg, reasons)
    keep = reasons == ""
    kept = [d for d, k in zip(images, keep) if k]
    names = label.filter(pa.array(keep)).fill_null("").to_pylist()
    split = [split_of(hashlib.sha256(d).hexdigest(), lab, cfg.split_salt, cfg.validation_fraction) for d, lab in zip(kept, names)]
    rows = pa.Table.from_arrays(
        [pa.array(kept, pa.binary()), index.filter(pa.array(keep)).cast(pa.int64()), pa.array(split, pa.string())], schema=IMAGE_ROWS_SCHEMA
    )
    return rows, dict(Counter(r for r in reasons if r)), _new_labels(label, reasons)


def _labels(table: pa.Table, cfg: DataConfig, reasons: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """Each row's label name and its index into data.labels (-1 without a label column); rows
    without one, or with one that is not a label, get their reason."""
    n = table.num_rows
    if not cfg.label_column:
        return pa.nulls(n, pa.string()), pa.array(np.full(n, -1, dtype=np.int64))
    label = _strings(table.column(cfg.label_column), reasons, "wrong_label_type")
    label = pc.utf8_trim_whitespace(pc.replace_substring(label, _INT_PREFIX, ""))
    _mark(reasons, pc.equal(pc.utf8_length(label.fill_null("")), 0), "missing_label")
    index = pc.index_in(label, value_set=pa.array(cfg.labels or [], pa.string()))
    _mark(reasons, index.is_null(), "new_label" if cfg.grow_labels else "unknown_label")
    return label, index


def _new_labels(label: pa.Array, reasons: np.ndarray) -> list[str]:
    """The names of the rows dropped only for a label that is new (DataConfig.grow_labels), in
    order of appearance."""
    return list(dict.fromkeys(label.filter(pa.array(reasons == "new_label")).to_pylist()))


def split_of(text: str, label: str, salt: str, validation_fraction: float) -> str:
    digest = hashlib.blake2b(f"{salt}\x00{text}\x00{label}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") / 2**64 < validation_fraction else "train"


def validation_fingerprint(cfg: DataConfig) -> str:
    """What a file's validation depends on: when any of it changes, pending files are judged again."""
    keys = ("format", "content", "text_column", "image_column", "label_column", "labels", "validation_fraction", "split_salt")
    # (absent when off or unset: earlier fingerprints stand)
    extra = {**({"grow_labels": True} if cfg.grow_labels else {}), **({"image_root": cfg.image_root} if cfg.image_root else {})}
    if cfg.response_column:
        extra.update(prompt_column=cfg.prompt_column, response_column=cfg.response_column)
    blob = json.dumps({"rules": RULES_VERSION, **{k: getattr(cfg, k) for k in keys}, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- reading files for a run (training, evaluation, export) ------------------------------------
# SPREAD, not the default: inside a Tune trial the default would capture these tasks into the
# trial's own tiny placement group, where they do not fit. One CPU each, as Ray Data's own tasks
# take (tokenizing needs a free CPU anyway): a fractional share ran more tasks than CPUs, and Ray
# started (then reaped) a worker process for each on every read, ~1 s of imports apiece, which
# cost more than the reading.
@ray.remote(num_cpus=1, scheduling_strategy="SPREAD", num_returns=2)
def read_files(fs: pafs.FileSystem, paths: list[str], cfg: DataConfig) -> tuple[list[FileReport], pa.Table | None]:
    """Copy, hash, parse and validate a group of files in one Ray task: (their reports, their
    valid rows as one table). Many small files (an image folder) share a task and a block."""
    reports, tables = [], []
    for path in paths:
        report, rows = read_file(fs, path, cfg)
        reports.append(report)
        if rows is not None and rows.num_rows:
            tables.append(rows)
    return reports, (pa.concat_tables(tables) if tables else None)


# Files read by one task, at most: an image folder's thousands of files become a few blocks.
MAX_FILES_PER_TASK = 256


def file_groups(files: list[str], cpus: int) -> list[list[str]]:
    """Consecutive files in groups: one file per task while there are few (each a block of its
    own, read in parallel), up to MAX_FILES_PER_TASK when there are many."""
    size = max(1, min(MAX_FILES_PER_TASK, len(files) // (4 * cpus)))
    return [files[i : i + size] for i in range(0, len(files), size)]


def read_file(fs: pafs.FileSystem, path: str, cfg: DataConfig) -> tuple[FileReport, pa.Table | None]:
    """Copy, hash, parse and validate one file: (its report, its valid rows)."""
    fmt = detect_format(path, cfg.format)
    shown = display_uri(fs, path)
    try:
        fetched, _ = fetch(fs, path)
    except SourceGone:
        return FileReport(shown, fmt, "missing", reason="the file disappeared before it could be read"), None
    except SourceUnstable as e:
        return FileReport(shown, fmt, "changing", reason=str(e)), None
    except OSError as e:
        return FileReport(shown, fmt, "unreadable", reason=f"could not be read after {TRANSIENT_RETRIES} tries: {first_line(e)}"), None
    try:
        parsed = parse_file(fetched, fmt, cfg, path, image_reader(fs, path, cfg.image_root))
    finally:
        fetched.close()
    report = FileReport(
        shown,
        fmt,
        "bad" if parsed.reason else "ok",
        size=fetched.size,
        sha256=fetched.sha256,
        reason=parsed.reason,
        read=parsed.read,
        dropped=parsed.dropped,
        mtime_ns=fetched.mtime_ns,
        rows=parsed.rows.num_rows if parsed.rows is not None else 0,
        splits=split_counts(parsed.rows),
    )
    return report, parsed.rows


def split_counts(rows: pa.Table | None) -> dict[str, int]:
    if rows is None or not rows.num_rows:
        return {}
    counts = rows.group_by("split").aggregate([("split", "count")])
    return dict(zip(counts.column("split").to_pylist(), counts.column("split_count").to_pylist()))


def quarantine(storage: Storage, area: str, fs: pafs.FileSystem, path: str, reason: str) -> str:
    """Copy a rejected file under <root>/quarantine/<area>/ beside a note of why (the source is
    left alone). Named by a digest of its full path too, so `a/part-0.jsonl` and `b/part-0.jsonl`
    keep separate copies. A copy that fails (the source vanished) leaves the note alone."""
    key = hashlib.sha256(display_uri(fs, path).encode()).hexdigest()[:10]
    dest = f"quarantine/{area}/{key}-{posixpath.basename(path)}"
    note = {"source": display_uri(fs, path), "reason": reason, "quarantined_at": datetime.now(timezone.utc).isoformat()}
    try:
        storage.fs.create_dir(storage.path(f"quarantine/{area}"), recursive=True)
        pafs.copy_files(path, storage.path(dest), source_filesystem=fs, destination_filesystem=storage.fs)
    except OSError as e:
        note["copy"] = f"not copied: {first_line(e)}"
    storage.write_json(f"{dest}.reason.json", note)
    return dest


@dataclass
class ValidatedData:
    """Valid rows (text or image, label, split), plus the report of what was found: held in the
    object store (`rows`, read by Ray tasks) or, for data of at most `data.in_process_mb`, here in
    the driver (`table`)."""

    report: DataReport
    rows: ray.data.Dataset | None = None
    table: pa.Table | None = None

    def split(self, name: str | None) -> ray.data.Dataset:
        """Valid rows of one split ("train", "validation") or of all (None): text (or image), label."""
        rows = self.split_rows(name)
        return dataset_of([rows]) if isinstance(rows, pa.Table) else rows

    def split_rows(self, name: str | None) -> ray.data.Dataset | pa.Table:
        """`split`, as a table where the rows were read here: what `tokenized` takes either way."""
        if self.table is not None:
            return _only(self.table, name)
        return self.rows.map_batches(_only, fn_kwargs={"split": name}, batch_format="pyarrow")


def _only(batch: pa.Table, split: str | None) -> pa.Table:
    if split is not None:
        batch = batch.filter(pc.equal(batch.column("split"), split))
    kept = [batch.column_names[0], "label", *([RESPONSE] if RESPONSE in batch.column_names else [])]
    return batch.select(kept)  # content (text, prompt or image), label[, response]


def read_validated(
    cfg: DataConfig, storage: Storage, quarantine_area: str, path: str | None = None, files: list[str] | None = None
) -> ValidatedData:
    """Find (or take `files`: paths or URIs on one filesystem), read, validate and quarantine;
    fails only when nothing valid remains or a file cannot be read at all right now. Each file is
    read once; its valid rows stay in the object store (spilled to disk when large) for every
    later pass (counting, tokenizing, every epoch)."""
    size = None  # of the given files: unknown
    if files:
        source = path or "(the given files)"
        fs, _ = filesystem_for(files[0])
        files = [filesystem_for(f)[1] for f in files]
    else:
        source = path or cfg.path
        if not is_uri(source):
            source = str(Path(source).expanduser().resolve())
        exclude = (storage.base,) if storage.is_local else ()
        fs, infos = list_data_infos(source, exclude)
        files = [i.path for i in infos]
        # Images named by a table's rows are not in the listing's sizes: such tables go to Ray.
        counted = cfg.content == "text" or {detect_format(f, cfg.format) for f in files} == {"image"}
        if counted and None not in (sizes := [i.size for i in infos]):
            size = sum(sizes)
    here = size is not None and size <= cfg.in_process_mb * 2**20
    if here:  # the same reading, in this process: no Ray worker to start and import for it
        read = [read_file(fs, f, cfg) for f in files]
        reports, tables = [r for r, _ in read], [t for _, t in read if t is not None and t.num_rows]
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pairs = [read_files.remote(fs, group, cfg) for group in file_groups(files, cpus)]
        groups = gather([reports for reports, _ in pairs], f"reading {source}")
        reports = [r for group in groups for r in group]
    trouble = [r for r in reports if r.state in ("missing", "unreadable", "changing")]
    if trouble:
        lines = "\n".join(f"  - {r.path}: {r.reason}" for r in trouble)
        raise DataError(f"could not read every file of '{source}' (nothing was quarantined; run again once they are readable):\n{lines}")
    for bad, inner in ((r, f) for r, f in zip(reports, files) if r.state == "bad"):
        quarantine(storage, quarantine_area, fs, inner, bad.reason)
    report = DataReport(source=source, files=reports)
    if not report.used_files:
        reasons = "\n".join(f"  - {r.path}: {r.reason}" for r in reports)
        raise DataError(f"no readable data in '{source}'; every file was quarantined:\n{reasons}")
    for r in reports:
        for reason, n in r.dropped.items():
            report.dropped[reason] = report.dropped.get(reason, 0) + n
        for split, n in r.splits.items():
            report.rows[split] = report.rows.get(split, 0) + n
    if not report.rows:
        raise DataError(f"no valid rows in '{source}': {report.summary()}")
    if here:
        return ValidatedData(report=report, table=pa.concat_tables(tables, promote_options="default"))
    refs = [table for group, (_, table) in zip(groups, pairs) if any(r.rows for r in group)]
    rows = ray.data.from_arrow_refs(refs)
    blocks = block_count(len(refs), sum(report.rows.values()), cpus)
    if blocks > len(refs):
        rows = rows.repartition(blocks)  # a few large files: every CPU tokenizes a share
    return ValidatedData(report=report, rows=rows)


# A block is worth a task of its own from this many rows on (tokenizing it takes ~0.1 s).
MIN_BLOCK_ROWS = 8192


def block_count(files: int, rows: int, cpus: int) -> int:
    """Blocks for the valid rows: one per file, unless fewer files than twice the CPUs hold
    enough rows to keep every CPU busy (a single 200k-row file would tokenize in one task)."""
    return max(files, min(2 * cpus, rows // MIN_BLOCK_ROWS))


# --- tokenization ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerRef:
    """Where a run's tokenizer lives, in a form that means the same on every node: a registry
    version (NAME:VERSION in the registry on `root`), or a directory given as a local path or a
    storage URI. It travels to Ray Data tasks and training workers, which resolve it where they
    run (`local_dir`, downloaded once per process); a driver's temp or cache path never does."""

    location: str = ""
    version: str | None = None
    root: str | None = None

    def local_dir(self) -> str:
        return _tokenizer_dir(self)


@functools.lru_cache(maxsize=16)
def _tokenizer_dir(ref: TokenizerRef) -> str:
    from lifelong.registry import Registry

    if ref.version:
        return str(Registry(Storage(ref.root)).preprocessor_dir(ref.version))
    if not is_uri(ref.location):
        return ref.location
    cache = local_cache_dir("tokenizers", hashlib.sha256(ref.location.encode()).hexdigest()[:20])
    if not any((cache / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        Storage(ref.location).download_dir_into("", cache)
    return str(cache)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(tokenizer: TokenizerRef | str):
    """Resolved and loaded once per Ray worker process (on its own node), then reused by every
    batch. A directory with a `tokenizer.json` loads through HF's fast-tokenizer class alone,
    which encodes the same as AutoTokenizer's choice but imports no torch (AutoTokenizer costs
    every fresh Ray Data worker ~3 s of imports before its first batch)."""
    directory = tokenizer.local_dir() if isinstance(tokenizer, TokenizerRef) else str(tokenizer)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        from lifelong.models import load_tokenizer

        return load_tokenizer(directory)
    from transformers import PreTrainedTokenizerFast

    return with_pad_token(PreTrainedTokenizerFast.from_pretrained(directory))


def with_pad_token(tok):
    if tok.pad_token is None:
        # GPT-2-style tokenizers have no pad token; EOS is the usual stand-in.
        tok.pad_token = tok.eos_token
    return tok


# A continual cycle's column marking replayed rows (1) among the window's new ones (0), carried
# through tokenization (the task's `tokenize`) to the loop, which weighs and distills them.
REPLAYED = "replayed"


# Large batches pack causal-LM text with little waste at block boundaries.
TOKENIZE_BATCH = 512
# Tokenized here, model inputs go to the object store in blocks of about this size: the driver
# never holds more (images at a model's size take hundreds of times their PNG bytes), and Ray
# starts one metadata task per block, not per batch.
IN_PROCESS_BLOCK_BYTES = 32 * 2**20


def tokenized(
    rows: ray.data.Dataset | pa.Table, task: str, tokenizer: TokenizerRef, max_length: int, pack: bool = False
) -> ray.data.Dataset:
    """The task's model inputs of `rows`: by Ray Data tasks for a dataset, here for a table in the
    driver (data.in_process_mb), batch by batch alike, as blocks in the object store. `pack`:
    data.pack (several instruction rows to a block)."""
    from lifelong.tasks import task as family

    fn = family(task).tokenize
    kwargs = {"tokenizer": tokenizer, "max_length": max_length, "pack": pack}
    if isinstance(rows, pa.Table):
        return _tokenized_here(rows, fn, kwargs)
    return rows.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=TOKENIZE_BATCH)


def _tokenized_here(rows: pa.Table, fn: Callable, kwargs: dict) -> ray.data.Dataset:
    from ray.data.block import BlockAccessor

    tables, pending, pending_bytes = [], [], 0
    for start in range(0, rows.num_rows, TOKENIZE_BATCH):
        block = BlockAccessor.batch_to_block(fn(rows.slice(start, TOKENIZE_BATCH), **kwargs))
        if block.num_rows or not (tables or pending):  # an empty one only to carry the columns
            pending.append(block)
            pending_bytes += block.nbytes
        if pending_bytes >= IN_PROCESS_BLOCK_BYTES or (pending and start + TOKENIZE_BATCH >= rows.num_rows):
            tables.append(pa.concat_tables(pending))
            pending, pending_bytes = [], 0
    return dataset_of(tables)


def dataset_of(tables: list[pa.Table]) -> ray.data.MaterializedDataset:
    """`ray.data.from_arrow(tables)`, less its remote task per table: Ray Data asks a worker for
    each table's row count and schema, and on a fresh Ray each such task starts a worker process
    (`lifelong evaluate` of a small file started 5: 4.5 of its 20 CPU-s, measured 2026-12-03).
    The tables are here, and so is what those tasks would compute."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.from_operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data._internal.util import get_table_block_metadata_schema
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset

    metadata = [get_table_block_metadata_schema(t) for t in tables]
    context = DataContext.get_current().copy()
    plan = LogicalPlan(FromArrow([ray.put(t) for t in tables], metadata), context)
    return MaterializedDataset(plan, context, DatasetStats(metadata={"FromArrow": metadata}, parent=None))


def first_rows(rows: ray.data.Dataset | pa.Table, limit: int) -> list[dict]:
    """Up to `limit` rows as dicts, from the object store or from a table already here."""
    return rows.slice(0, limit).to_pylist() if isinstance(rows, pa.Table) else rows.take(limit)


def text_iterator(rows: ray.data.Dataset | pa.Table, limit: int):
    """Stream up to `limit` texts to the driver (for training a tokenizer), batch by batch."""
    seen = 0
    batches = [rows] if isinstance(rows, pa.Table) else rows.iter_batches(batch_size=256, batch_format="pyarrow")
    for batch in batches:
        for text in batch.column("text").to_pylist():
            yield text
            seen += 1
            if seen >= limit:
                return
