"""Batch predictions (`lifelong predict REF DATA OUT`): a registry version scores a data set.

    DATA (files, a directory, a glob; local or a URI) ─▶ Ray Data read (every column, its file)
      ─▶ map_batches(Predictor: the version, ONNX Runtime when exported) ─▶ OUT/*.parquet

Every input row comes out, in order, with its columns (image bytes aside) and the version's
answer: `prediction`, `confidence`, `probabilities` (a struct, one field per label), `truncated`,
`model`, `version`; a row that cannot be scored (no text, bytes that are not an image) keeps its
place with `error` saying why, and nothing else stops the others. The same backends as serving
(lifelong.inference), so what is predicted here is what the endpoint answers.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from lifelong.data import detect_format, image_problem, image_reason, list_data_files
from lifelong.errors import DataError, LifelongError
from lifelong.registry import Registry
from lifelong.storage import Storage, filesystem_for
from lifelong.tasks import task

# Columns added to each row; an input column of the same name is refused rather than overwritten.
ADDED = ("prediction", "confidence", "probabilities", "truncated", "error", "model", "version")
PROBLEM = "__lifelong_problem"  # a row's reason found while reading (a JSONL line that is not an object)


@dataclass
class PredictionReport:
    model: str
    version: int
    backend: str
    out: str
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)  # rows per predicted label

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Predictor:
    """A Ray Data actor: loads the version once (the same Classifier the endpoint serves) and
    answers batches of rows."""

    def __init__(self, storage_root: str, name: str, version: int, backend: str, column: str, content: str):
        registry = Registry(Storage(storage_root))
        card = registry.card(name, version)
        family = task(card.task)
        self.model = family.serving_model(registry.model_dir(name, version), backend, card.max_length, 1, "cpu")
        self.name, self.version, self.column, self.content = name, version, column, content
        self.labels = list(self.model.labels)
        self.struct = pa.struct([(label, pa.float32()) for label in self.labels])

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        read = batch.column(PROBLEM).to_pylist()  # every parsed file has it (parse_files)
        batch = batch.drop_columns([PROBLEM])
        if self.column not in batch.column_names:  # JSONL lines none of which had it
            batch = batch.append_column(self.column, pa.nulls(n, pa.string()))
        values = batch.column(self.column).to_pylist()
        judged = [(None, problem) if problem else self._item(v) for v, problem in zip(values, read)]
        items, errors = zip(*judged) if judged else ((), ())
        ok = [i for i, e in enumerate(errors) if e is None]
        probs = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        truncated = [None] * n
        if ok:
            p, cut = self.model.probabilities([items[i] for i in ok])
            probs[ok] = p
            for i, c in zip(ok, cut):
                truncated[i] = bool(c)
        valid = np.array([e is None for e in errors], dtype=bool)
        best = probs.argmax(axis=1)
        prediction = pa.array([self.labels[b] if v else None for b, v in zip(best, valid)], pa.string())
        confidence = pa.array(np.where(valid, probs.max(axis=1, initial=-np.inf), np.nan), pa.float32(), mask=~valid)
        columns = [pa.array(probs[:, j], pa.float32(), mask=~valid) for j in range(len(self.labels))]
        probabilities = pa.StructArray.from_arrays(columns, fields=list(self.struct), mask=pa.array(~valid))
        if self.content == "image" and pa.types.is_binary(batch.schema.field(self.column).type):
            batch = batch.drop_columns([self.column])  # the bytes stay in the input; `path` names them
        added = {
            "prediction": prediction,
            "confidence": confidence,
            "probabilities": probabilities,
            "truncated": pa.array(truncated, pa.bool_()),
            "error": pa.array(list(errors), pa.string()),
            "model": pa.array([self.name] * n, pa.string()),
            "version": pa.array([self.version] * n, pa.int32()),
        }
        for name, column in added.items():
            batch = batch.append_column(name, column)
        return batch

    def _item(self, value) -> tuple[object, str | None]:
        """A row's value as the model takes it, or why it cannot be scored."""
        if value is None:
            return None, f"no {self.content} ({self.column} is empty)"
        if self.content == "text":
            if not isinstance(value, str):
                return None, f"{self.column} is a {type(value).__name__}, not text"
            return (value, None) if value.strip() else (None, f"empty text in {self.column}")
        if isinstance(value, str):  # base64 in a JSONL or CSV table
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return None, f"{self.column} is text that is not base64 image bytes"
        if not isinstance(value, bytes):
            return None, f"{self.column} is a {type(value).__name__}, not image bytes"
        problem = image_problem(value)
        return (value, None) if not problem else (None, image_reason(problem))


def list_inputs(data: str, content: str) -> tuple[pafs.FileSystem, dict[str, list[str]]]:
    """The files of `data` (a file, a directory, a glob) by format, or one message naming why not."""
    fs, inner = filesystem_for(data)
    if not any(ch in inner for ch in "*?[") and fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise DataError(f"DATA {data} does not exist: give a file, a directory or a glob")
    fs, files = list_data_files(data)
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(detect_format(f), []).append(f)
    if None in by_format:
        raise DataError(f"cannot tell the format of {by_format[None][0]} (of '{data}'): use .parquet, .jsonl, .csv or image files")
    if "image" in by_format and content != "image":
        raise DataError(f"'{data}' holds image files ({by_format['image'][0]}), but this version reads text")
    return fs, by_format


def read_inputs(fs: pafs.FileSystem, by_format: dict[str, list[str]], column: str) -> ray.data.Dataset:
    """Every row of those files, file after file in their listed order, with every column and its
    file (`path`); an image file is one row (its bytes in `column`)."""
    files = sorted(f for group in by_format.values() for f in group)
    raw = ray.data.read_binary_files(files, filesystem=fs, include_paths=True)
    return raw.map_batches(parse_files, fn_args=(column,), batch_size=1, batch_format="pyarrow")


def parse_files(batch: pa.Table, column: str) -> pa.Table:
    """Files (Ray Data's `bytes`, `path`) → their rows, each with its file and PROBLEM (what makes
    it unscorable before the model sees it: a JSONL line that is not a JSON object, say)."""
    tables = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        fmt = detect_format(path)
        if fmt == "image":
            table = pa.table({column: pa.array([data], pa.binary())})
        elif fmt == "parquet":
            table = pq.read_table(pa.BufferReader(data))
        elif fmt == "csv":
            table = pacsv.read_csv(pa.BufferReader(data))
        else:  # line by line: one bad line, or a value whose type differs from the lines before, is that row's error alone
            table = parse_lines(data.decode("utf-8", errors="replace").splitlines(), column)
        table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
        if PROBLEM not in table.column_names:
            table = table.append_column(PROBLEM, pa.nulls(table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive")


def parse_lines(lines: list[str], column: str) -> pa.Table:
    """JSONL lines → one row per (non-empty) line: the object's fields and PROBLEM."""
    objects, problems = [], []
    for line in filter(str.strip, lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            obj, problem = {}, f"a line that is not JSON ({e.msg})"
        else:
            problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__} on its line, not an object"
        objects.append(obj if problem is None else {})
        problems.append(problem)
    for i, obj in enumerate(objects):
        value = obj.get(column)
        if problems[i] is None and value is not None and not isinstance(value, str):  # base64 images are strings too
            problems[i] = f"{column} is a JSON {type(value).__name__}, not text (or base64 image bytes)"
            obj[column] = None
    keys = list(dict.fromkeys(k for obj in objects for k in obj))
    columns = {k: _column([obj.get(k) for obj in objects], k == column) for k in keys}
    columns[PROBLEM] = pa.array(problems, pa.string())
    return pa.table(columns)


def _column(values: list, content: bool) -> pa.Array:
    """Values as Arrow takes them; a column whose types differ from row to row keeps each value
    as its JSON text (the content column holds strings only: `parse_lines` named the others)."""
    if content:
        return pa.array(values, pa.string())
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


@dataclass
class Request:
    """What `lifelong predict` was asked, checked before Ray starts."""

    storage_root: str
    name: str
    version: int
    backend: str
    content: str  # "text" or "image"
    column: str
    out: str
    data: str
    fs: pafs.FileSystem
    files: dict[str, list[str]]  # by format


def check_request(storage_root: str, ref: str, data: str, out: str, backend: str | None = None, column: str | None = None) -> Request:
    """The version `ref` names, the backend to run it with and where to write, or one message
    naming what is wrong (nothing has been read or written yet)."""
    registry = Registry(Storage(storage_root))
    resolved = registry.resolve(ref, weights=False)
    if resolved.name is None:
        raise LifelongError(f"'{ref}' is a directory, not a registry reference (NAME:VERSION or NAME@ALIAS): register it first")
    card = resolved.card
    family = task(card.task)
    if not family.LABELLED:
        raise LifelongError(
            f"{resolved.ref} is a {card.task} model: lifelong predict scores classifiers (text or images); "
            "a language model answers through `lifelong serve` (/v1/generate) and is judged by `lifelong evaluate`"
        )
    backend = backend or ("onnx" if "onnx" in card.exports else "torch")
    if backend not in family.EXPORT_FORMATS + ("torch",):
        raise LifelongError(f"--backend {backend}: use one of {', '.join(family.EXPORT_FORMATS + ('torch',))}")
    if backend != "torch" and backend not in card.exports:
        raise LifelongError(f"{resolved.ref} has no {backend} export: run `lifelong export {resolved.ref}` first, or use --backend torch")
    content = family.CONTENT
    column = column or card.data_config.get(f"{content}_column") or content
    out_fs, out_path = filesystem_for(out)
    info = out_fs.get_file_info(out_path)
    if info.type == pafs.FileType.File:
        raise LifelongError(f"OUT {out} is a file: give a directory (it gets one Parquet file per block)")
    if info.type == pafs.FileType.Directory and out_fs.get_file_info(pafs.FileSelector(out_path)):
        raise LifelongError(f"OUT {out} already holds files: give a new or empty directory (earlier predictions are never overwritten)")
    fs, files = list_inputs(data, content)
    check_columns(fs, files, data, column, content)
    return Request(storage_root, resolved.name, resolved.version, backend, content, column, out, data, fs, files)


def check_columns(fs: pafs.FileSystem, files: dict[str, list[str]], data: str, column: str, content: str) -> None:
    """The first file (of the listing's order) has the content column and none that predictions add."""
    first = min(f for group in files.values() for f in group)
    if detect_format(first) == "parquet":
        with fs.open_input_file(first) as f:
            names = pq.read_schema(f).names
    else:
        with fs.open_input_stream(first) as f:
            names = parse_files(pa.table({"bytes": [f.read()], "path": [first]}), column).column_names
    names = [n for n in names if n not in ("path", PROBLEM)]
    if column not in names and detect_format(first) != "jsonl":  # JSONL: a row without it is that row's error
        raise DataError(
            f"{first} (of '{data}') has no column '{column}' (its columns: {', '.join(names)}): name the {content} column with --column"
        )
    clash = sorted(set(names) & set(ADDED))
    if clash:
        raise DataError(f"{first} (of '{data}') already has column(s) {clash}, which predictions add: rename them first")


def predict(request: Request, batch_size: int = 64) -> PredictionReport:
    """Score the request's data on the connected Ray; Parquet files go under its `out`."""
    options = ray.data.DataContext.get_current().execution_options
    ordered = options.preserve_order
    options.preserve_order = True  # rows come out in the order they went in (a dataset keeps the context it was made in)
    try:
        rows = read_inputs(request.fs, request.files, request.column)
    finally:
        options.preserve_order = ordered
    scored = rows.map_batches(
        Predictor,
        fn_constructor_args=(request.storage_root, request.name, request.version, request.backend, request.column, request.content),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))),
    )
    out_fs, out_path = filesystem_for(request.out)
    scored.write_parquet(out_path, filesystem=out_fs)
    written = pq.read_table(out_path, filesystem=out_fs, columns=["prediction", "error"])
    counts = pc.value_counts(written.column("prediction").drop_null()).to_pylist()
    return PredictionReport(
        model=request.name,
        version=request.version,
        backend=request.backend,
        out=request.out,
        rows=written.num_rows,
        errors=dict(Counter(e for e in written.column("error").to_pylist() if e is not None)),
        predicted={c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])},
    )
