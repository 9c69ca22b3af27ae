"""The loop back from serving: recorded answers, the labels users send for them, and the labelled
rows a stream trains on.

    <root>/predictions/<model>/answers/<day>/<time>-<replica>-<n>.parquet    sampled requests and answers
    <root>/predictions/<model>/feedback/<day>/<time>-<replica>-<n>.parquet   POST /v1/feedback labels
    <root>/streams/<stream>/feedback/landed.json                             what was landed, by request
    <root>/streams/<stream>/feedback/outbox/<file>                           a joined file until it has landed

- **Off the request path.** A replica appends a record to a bounded queue (`RecordLog.add`); a
  thread of its own writes the queue to the store, one Parquet file per flush. A store that is
  slow or down never slows or fails a request: records wait in the queue up to its bound, and
  beyond it new ones are dropped and counted (`/v1/model`, `lifelong_serve_log_records_total`).
- **Whole requests, picked by id.** A request is recorded when the hash of its request id falls
  in the sample, so every item of it is, and its shadow answer (`role: shadow`) with it.
- **One label per request item.** The first label for a (request id, item) is its label; a later
  one is a correction. A cycle joins the labels with the recorded answers (`join_feedback`) and
  lands the rows not landed before as one Parquet file in the stream's landing zone; the ledger
  then trains on each exactly once. A correction that comes before its row landed replaces the
  label; one that comes after is counted and used for live accuracy, and not landed again (that
  input was trained on once already).
- **Exactly once across a crash.** The joined file is written to the stream's outbox first, then
  copied to the landing zone, then its requests are marked landed; a join that stopped in between
  lands the same bytes again, which the ledger knows by their hash.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from lifelong import metrics as prometheus
from lifelong.storage import Storage, filesystem_for

logger = logging.getLogger("ray.serve")

ANSWERS, FEEDBACK = "answers", "feedback"
ANSWER_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("index", pa.int32()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("version", pa.int64()),
        ("role", pa.string()),  # champion (answered) or shadow (compared only)
        ("input", pa.string()),  # a text or a prompt
        ("image", pa.binary()),  # an image's encoded bytes
        ("label", pa.string()),  # a classifier's answer
        ("probabilities", pa.string()),  # JSON {label: probability}
        ("output", pa.string()),  # a generated text
        ("latency_ms", pa.float64()),
        ("replica", pa.string()),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("index", pa.int32()),
        ("label", pa.string()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("replica", pa.string()),
    ]
)
SCHEMAS = {ANSWERS: ANSWER_SCHEMA, FEEDBACK: FEEDBACK_SCHEMA}


def sampled(request_id: str, share: float, salt: str = "") -> bool:
    """Whether a request falls in a share, the same answer for the same id on every replica."""
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{salt}{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def day_of(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def _prefix(model: str, kind: str) -> str:
    return f"predictions/{model}/{kind}"


def lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: a thread has a nice value of its
    own): background work (the log's writes, the shadow's answers) then runs on what callers leave."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


# --- the replicas' writer ------------------------------------------------------------------------
class RecordLog:
    """A replica's records on their way to the store: `add` never blocks on I/O; a thread writes
    them every `flush_interval_s`. At most `max_buffered` records of each kind (and
    `max_buffered_bytes` of inputs) wait; beyond that a new record is refused and counted, and so
    is a batch the store refused when the queue has no room to keep it for the next try. Each
    kind has its own room: answers, plentiful, never crowd out feedback."""

    def __init__(
        self,
        root: str,
        model: str,
        replica: str,
        *,
        flush_interval_s: float,
        max_buffered: int,
        max_buffered_bytes: int = 64 << 20,
    ):
        self.storage, self.model, self.replica = Storage(root), model, replica
        self.flush_interval_s, self.max_buffered, self.max_buffered_bytes = flush_interval_s, max_buffered, max_buffered_bytes
        self.queue: collections.deque[tuple[str, dict, int]] = collections.deque()
        self.queued_bytes = 0
        self.queued_kind: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # recorded, written, dropped (and dropped_full / dropped_store)
        self.files = 0
        self.failing: str | None = None  # the store's error while writes fail
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="lifelong-record-log", daemon=True)
        self.thread.start()

    def add(self, kind: str, record: dict) -> bool:
        size = len(record.get("input") or "") + len(record.get("image") or b"") + len(record.get("output") or "") + 200
        with self.lock:
            if self.queued_kind[kind] >= self.max_buffered or self.queued_bytes + size > self.max_buffered_bytes:
                self._dropped("full", 1)
                return False
            self.queue.append((kind, record, size))
            self.queued_bytes += size
            self.queued_kind[kind] += 1
            self.counts["recorded"] += 1
        return True

    def _dropped(self, why: str, n: int) -> None:
        self.counts["dropped"] += n
        self.counts[f"dropped_{why}"] += n
        prometheus.record("lifelong_serve_log_records_total", n, model=self.model, outcome=f"dropped_{why}")

    def stats(self) -> dict:
        with self.lock:
            return {
                "recorded": self.counts["recorded"],
                "written": self.counts["written"],
                "dropped": self.counts["dropped"],
                "dropped_queue_full": self.counts["dropped_full"],
                "dropped_store_failed": self.counts["dropped_store"],
                "queued": len(self.queue),
                "files": self.files,
                "store_error": self.failing,
            }

    def _run(self) -> None:
        lowest_priority()  # writes run on what requests leave of the CPU
        while not self.stopping.is_set():
            self.wake.wait(self.flush_interval_s)
            self.wake.clear()
            self.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (one try) and stop the thread."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout_s)
        self.flush()

    def flush(self) -> None:
        with self.lock:
            batch = list(self.queue)
            self.queue.clear()
            self.queued_bytes = 0
            self.queued_kind.clear()
        if not batch:
            return
        by_kind: dict[str, list[tuple[str, dict, int]]] = collections.defaultdict(list)
        for item in batch:
            by_kind[item[0]].append(item)
        for kind, items in by_kind.items():
            try:
                self._write(kind, [record for _, record, _ in items])
            except Exception as e:  # the store is slow, full or down: keep what fits, count the rest
                self._refused(items, f"{type(e).__name__}: {e}")
            else:
                with self.lock:
                    self.counts["written"] += len(items)
                prometheus.record("lifelong_serve_log_records_total", len(items), model=self.model, outcome="written")
                if self.failing:
                    logger.warning("prediction log of %s: the store takes records again", self.model)
                    self.failing = None

    def _refused(self, items: list, error: str) -> None:
        if self.failing is None:
            logger.warning(
                "prediction log of %s: cannot write to %s (%s); records wait, up to %d", self.model, self.storage, error, self.max_buffered
            )
        self.failing = error
        with self.lock:
            room = max(0, self.max_buffered - self.queued_kind[items[0][0]])
            kept = items[:room]
            for item in reversed(kept):
                self.queue.appendleft(item)
                self.queued_bytes += item[2]
                self.queued_kind[item[0]] += 1
        if len(items) > len(kept):
            self._dropped("store", len(items) - len(kept))

    def _write(self, kind: str, records: list[dict]) -> None:
        now = time.time()
        table = pa.Table.from_pylist(records, schema=SCHEMAS[kind])
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.files += 1
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%H%M%S%f")
        self.storage.write_bytes(f"{_prefix(self.model, kind)}/{day_of(now)}/{stamp}-{self.replica}-{self.files}.parquet", sink.getvalue())


# --- reading them back ---------------------------------------------------------------------------
def _days(storage: Storage, model: str, kind: str, retention_days: int) -> list[str]:
    oldest = day_of(time.time() - retention_days * 86400)
    return [d for d in storage.listdir(_prefix(model, kind)) if d >= oldest and not d.startswith(".")]


# Files are written whole under names of their own and never change: what a long-lived reader (the
# follower, the continual daemon) read of one is kept, without the inputs, so that each read costs
# only the files new since the last one.
CONTENT_COLUMNS = ("input", "image", "output", "probabilities")
_read: dict[tuple[str, str, tuple[str, ...]], pa.Table] = {}


def record_files(storage: Storage, model: str, kind: str, retention_days: int) -> list[str]:
    """The record files of `kind` within the retention, oldest day first."""
    files = []
    for day in _days(storage, model, kind, retention_days):
        files += [
            f"{_prefix(model, kind)}/{day}/{n}"
            for n in storage.listdir(f"{_prefix(model, kind)}/{day}")
            if n.endswith(".parquet") and n[0] != "."
        ]
    return files


def read_records(
    storage: Storage, model: str, kind: str, retention_days: int, columns: list[str] | None = None, files: list[str] | None = None
) -> pa.Table:
    """Every record of `kind` within the retention (or of `files`), with the `file` it is in (an
    unreadable file is skipped and named in the log)."""
    columns = list(columns or SCHEMAS[kind].names)
    schema = pa.schema([SCHEMAS[kind].field(c) for c in columns] + [pa.field("file", pa.string())])
    cacheable = not set(columns) & set(CONTENT_COLUMNS)
    listed = record_files(storage, model, kind, retention_days) if files is None else files
    if cacheable and files is None:  # what left the retention leaves the cache too
        keep = set(listed)
        for key in [k for k in _read if k[0] == storage.root_uri and k[1].startswith(_prefix(model, kind)) and k[1] not in keep]:
            del _read[key]
    tables = []
    for rel in listed:
        key = (storage.root_uri, rel, tuple(columns))
        table = _read.get(key) if cacheable else None
        if table is None:
            try:
                table = pq.read_table(storage.path(rel), filesystem=storage.fs, columns=columns)
            except Exception as e:
                logger.warning("skipping %s: %s", storage.uri_of(rel), e)
                continue
            table = table.cast(pa.schema([SCHEMAS[kind].field(c) for c in columns])).append_column(
                "file", pa.array([rel] * table.num_rows, pa.string())
            )
            if cacheable:
                _read[key] = table
        tables.append(table)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def prune(storage: Storage, model: str, retention_days: int) -> list[str]:
    """Delete the days of records and feedback older than the retention; returns what went."""
    gone = []
    oldest = day_of(time.time() - retention_days * 86400)
    for kind in (ANSWERS, FEEDBACK):
        for day in storage.listdir(_prefix(model, kind)):
            if day < oldest:
                storage.fs.delete_dir(storage.path(f"{_prefix(model, kind)}/{day}"))
                gone.append(f"{kind}/{day}")
    return gone


def compact(storage: Storage, model: str, retention_days: int) -> list[str]:
    """Each past day's record files (a replica writes one per flush) as one file, so that a day
    costs one listing entry and one read. The compacted file names the files it holds (in its
    Parquet metadata) and is written only if absent; then they are deleted. A compaction that
    stopped in between finishes the next time (a compacted file's sources still there are
    deleted first); a reader in between reads some records twice, and the readers count each
    record once. Returns the days compacted."""
    today, done = day_of(time.time()), []
    for kind in (ANSWERS, FEEDBACK):
        for day in _days(storage, model, kind, retention_days):
            if day >= today:
                continue
            folder = f"{_prefix(model, kind)}/{day}"
            names = [n for n in storage.listdir(folder) if n.endswith(".parquet") and n[0] != "."]
            for name in (n for n in names if n.startswith("compact-")):
                metadata = pq.read_schema(storage.path(f"{folder}/{name}"), filesystem=storage.fs).metadata or {}
                for source in json.loads(metadata.get(b"lifelong.sources", b"[]")):
                    if source in names:
                        storage.delete(f"{folder}/{source}")
                        names.remove(source)
            small = sorted(n for n in names if not n.startswith("compact-"))
            if len(small) < 2:
                continue
            table = pa.concat_tables(
                [pq.read_table(storage.path(f"{folder}/{n}"), filesystem=storage.fs).cast(SCHEMAS[kind]) for n in small]
            )
            sink = io.BytesIO()
            pq.write_table(table.replace_schema_metadata({"lifelong.sources": json.dumps(small)}), sink)
            storage.create_exclusive(
                f"{folder}/compact-{hashlib.sha256(' '.join(small).encode()).hexdigest()[:16]}.parquet", sink.getvalue()
            )
            for n in small:
                storage.delete(f"{folder}/{n}")
            done.append(f"{kind}/{day}")
    return done


@dataclass
class Labels:
    """The labels sent for recorded requests: the first per (request id, item) and the latest."""

    first: dict[tuple[str, int], str] = field(default_factory=dict)
    latest: dict[tuple[str, int], str] = field(default_factory=dict)
    corrections: int = 0  # labels after the first for the same item

    @classmethod
    def read(cls, storage: Storage, model: str, retention_days: int) -> Labels:
        columns = ["request_id", "index", "label", "time", "replica"]
        table = read_records(storage, model, FEEDBACK, retention_days, columns).sort_by("time")
        out, seen = cls(), set()
        for rid, index, label, at, replica in zip(*(table.column(c).to_pylist() for c in columns)):
            if (rid, index, label, at, replica) in seen:  # one record read twice: a day being compacted
                continue
            seen.add((rid, index, label, at, replica))
            key = (rid, index)
            if key in out.first:
                out.corrections += 1
            else:
                out.first[key] = label
            out.latest[key] = label
        return out


def _truth(labels: dict[tuple[str, int], str]) -> pa.Table:
    keys = list(labels)
    return pa.table(
        {
            "request_id": pa.array([k[0] for k in keys], pa.string()),
            "index": pa.array([k[1] for k in keys], pa.int32()),
            "truth": pa.array(list(labels.values()), pa.string()),
        }
    )


def live_accuracy(storage: Storage, model: str, retention_days: int, labels: Labels | None = None) -> dict:
    """Accuracy per version and role from the labels users sent: {version: {role: {...}}}."""
    import pyarrow.compute as pc

    labels = labels or Labels.read(storage, model, retention_days)
    if not labels.latest:
        return {}
    answers = read_records(storage, model, ANSWERS, retention_days, ["request_id", "index", "version", "role", "label"])
    answers = answers.filter(pc.is_valid(answers.column("label")))
    # One answer per (request, item, role): a client that reuses a request id counts once.
    answers = answers.group_by(["request_id", "index", "role"], use_threads=False).aggregate([("version", "first"), ("label", "first")])
    joined = answers.join(_truth(labels.latest), ["request_id", "index"], join_type="inner")
    joined = joined.append_column("correct", pc.cast(pc.equal(joined.column("label_first"), joined.column("truth")), pa.int64()))
    counted = joined.group_by(["version_first", "role"]).aggregate([("correct", "count"), ("correct", "sum")])
    out: dict = {}
    for version, role, n, right in zip(*(counted.column(c).to_pylist() for c in ("version_first", "role", "correct_count", "correct_sum"))):
        out.setdefault(version, {})[role] = {"labelled": n, "correct": right, "accuracy": right / n}
    return out


# --- landing labelled rows -------------------------------------------------------------------------
@dataclass
class Joined:
    file: str | None = None  # the landed file's URI
    rows: int = 0
    feedback: int = 0  # labelled items known
    already: int = 0  # landed by an earlier join
    unmatched: int = 0  # labels whose request was not recorded (not sampled, or not written yet)
    corrections: int = 0
    late_corrections: int = 0  # corrections of rows already landed (counted, not landed again)
    recovered: bool = False

    def line(self) -> str:
        head = f"feedback: {self.rows} labelled row(s) landed" + (f" as {self.file}" if self.file else "")
        return (
            f"{head}; {self.feedback} labelled item(s), {self.already} landed before, {self.unmatched} without a recorded answer, "
            f"{self.corrections} correction(s)"
        )


def _landed_rel(stream: str) -> str:
    return f"streams/{stream}/feedback/landed.json"


def _outbox(stream: str) -> str:
    return f"streams/{stream}/feedback/outbox"


def join_feedback(config, storage: Storage, stream: str) -> Joined:
    """Land the labelled rows not landed before as one file in `continual.landing` (the caller
    holds the stream's cycle lock). Rows are the recorded champion answers' inputs with the
    latest label sent for them."""
    log = config.serve.log_predictions
    model = config.served_model
    joined = Joined()
    landed: dict[str, dict] = storage.read_json(_landed_rel(stream)) if storage.exists(_landed_rel(stream)) else {}
    for name in storage.listdir(_outbox(stream)):  # a join that stopped before its file was marked landed
        joined.recovered = True
        _land(config, storage, stream, name, storage.read_bytes(f"{_outbox(stream)}/{name}"), landed)
    labels = Labels.read(storage, model, log.retention_days)
    joined.feedback, joined.corrections = len(labels.latest), labels.corrections
    todo = {key: label for key, label in labels.latest.items() if _key(key) not in landed}
    joined.already = len(labels.latest) - len(todo)
    joined.late_corrections = sum(1 for key, label in labels.latest.items() if _key(key) in landed and landed[_key(key)]["label"] != label)
    if todo:
        import pyarrow.compute as pc

        # Which files hold the champion's answers to the labelled items: only those are read whole.
        keys = read_records(storage, model, ANSWERS, log.retention_days, ["request_id", "index", "role"])
        keys = keys.filter(pc.equal(keys.column("role"), "champion")).join(_truth(todo), ["request_id", "index"], join_type="inner")
        files = sorted(set(keys.column("file").to_pylist()))
        answers = read_records(storage, model, ANSWERS, log.retention_days, files=files)
        rows, found = _rows(config, answers, todo)
        joined.unmatched = len(todo) - len(found)
        if rows:
            name, data = _joined_file(config, rows)
            storage.write_bytes(f"{_outbox(stream)}/{name}", data)
            joined.file = _land(config, storage, stream, name, data, landed)
            joined.rows = len(rows)
    if _forget_old(landed, log.retention_days):
        storage.write_bytes(_landed_rel(stream), json.dumps(landed, sort_keys=True).encode())
    return joined


def landed_count(storage: Storage, stream: str) -> int:
    return len(storage.read_json(_landed_rel(stream))) if storage.exists(_landed_rel(stream)) else 0


def _key(key: tuple[str, int]) -> str:
    return f"{key[0]}#{key[1]}"


def _rows(config, answers: pa.Table, todo: dict) -> tuple[list[dict], set]:
    data = config.data
    content = data.content_column
    target = data.response_column or data.label_column or "label"
    rows, found = [], set()
    columns = {c: answers.column(c).to_pylist() for c in answers.column_names}
    for i in range(answers.num_rows):
        key = (columns["request_id"][i], columns["index"][i])
        if columns["role"][i] != "champion" or key not in todo or key in found:
            continue
        found.add(key)
        value = columns["image"][i] if data.content == "image" else columns["input"][i]
        rows.append(
            {
                content: value,
                target: todo[key],
                "request_id": key[0],
                "item": key[1],
                "served_version": columns["version"][i],
                "served_label": columns["label"][i],
                "answered_at": columns["time"][i],
            }
        )
    rows.sort(key=lambda r: (r["request_id"], r["item"]))
    return rows, found


def _joined_file(config, rows: list[dict]) -> tuple[str, bytes]:
    data = config.data
    content = data.content_column
    target = data.response_column or data.label_column or "label"
    schema = pa.schema(
        [
            (content, pa.binary() if data.content == "image" else pa.string()),
            (target, pa.string()),
            ("request_id", pa.string()),
            ("item", pa.int32()),
            ("served_version", pa.int64()),
            ("served_label", pa.string()),
            ("answered_at", pa.timestamp("ms", tz="UTC")),
        ]
    )
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    data_bytes = sink.getvalue()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"feedback-{stamp}-{hashlib.sha256(data_bytes).hexdigest()[:12]}.parquet", data_bytes


def _land(config, storage: Storage, stream: str, name: str, data: bytes, landed: dict) -> str:
    """Copy an outbox file into the landing zone (whole: written aside, then renamed), mark its
    rows landed, and empty the outbox of it."""
    fs, base = filesystem_for(config.continual.landing)
    target = posixpath.join(base, name)
    aside = posixpath.join(base, f".{name}.part")
    with fs.open_output_stream(aside) as out:
        out.write(data)
    fs.move(aside, target)
    table = pq.read_table(
        io.BytesIO(data), columns=["request_id", "item", config.data.response_column or config.data.label_column or "label"]
    )
    now = time.time()
    for rid, item, label in zip(*(c.to_pylist() for c in table.columns)):
        landed[_key((rid, item))] = {"file": name, "label": label, "at": now}
    storage.write_bytes(_landed_rel(stream), json.dumps(landed, sort_keys=True).encode())
    storage.delete(f"{_outbox(stream)}/{name}")
    return config.continual.landing.rstrip("/") + "/" + name


def _forget_old(landed: dict, retention_days: int) -> bool:
    """Landed marks outlive their feedback by a day at most: older labels are gone from the store."""
    oldest = time.time() - (retention_days + 1) * 86400
    old = [k for k, v in landed.items() if v["at"] < oldest]
    for key in old:
        del landed[key]
    return bool(old)
