"""The landing zone's ledger: every file that ever arrived, by content, and what became of it.

    <root>/streams/<stream>/ledger/<sha256>.json        one record per distinct content (the truth)
    <root>/streams/<stream>/ledger/open/<sha256>        a marker per pending record (cheap to list)
    <root>/streams/<stream>/ledger/index.json           path → size, mtime, content (a cache)
    <root>/streams/<stream>/objects/<sha[:2]>/<sha256>  the bytes as they landed (immutable)
    <root>/streams/<stream>/rows/<sha256>-<fp>.parquet  their valid rows under validation rules <fp>

What the ledger guarantees:
- **Exactly the recorded bytes are trained.** A new file is copied once into `objects/` while it
  is hashed, and parsed and validated from that copy; cycles read only its stored rows. A file
  that changes while it is read is left for the next poll; once recorded, later changes or the
  deletion of the landing file do not alter what trains.
- **Each content is trained at most once.** A copy under another name joins the record; a path
  that comes back with new bytes is new data, and when the old bytes were still pending they are
  `superseded` (never trained, never counted). Bytes appended to a consumed JSONL/CSV file are
  recognised (the old content is its prefix) and only the new rows are trained.
- **Nothing sticks the stream.** A file that cannot be parsed, has the wrong columns or no valid
  row is `quarantined` with its reason (per file: the others go on); a bad row is dropped and
  counted by reason on its file's record; I/O that keeps failing leaves the file for the next
  poll, never quarantined; a recorded file whose content can no longer be found is `missing`.
  `lifelong continual requeue` puts quarantined (and missing) files back once the cause is fixed.
- **Consumed only after registration.** A file is marked consumed by the version trained on it
  only after that version is registered (the cycle's window journal, `stream.py`, carries the
  link across a crash), so a crash anywhere leaves it pending or consumed, never lost or doubled.
- Records are created only-if-absent and updated by compare-and-swap (`Storage.replace_if`);
  everything that changes the ledger runs under the stream's cycle lock.

A poll reads the landing zone's listing, the index and the pending records: its cost grows with
what is new and what is pending, not with the stream's history.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs
import ray
from pydantic import BaseModel, ConfigDict, Field

from lifelong.config import DataConfig
from lifelong.data import (
    Fetched,
    ImageReader,
    SourceGone,
    SourceUnstable,
    detect_format,
    display_uri,
    fetch,
    image_reader,
    list_files,
    parse_file,
    split_counts,
    validation_fingerprint,
)
from lifelong.errors import LifelongError, first_line
from lifelong.runtime import gather
from lifelong.storage import Storage, filesystem_for, is_uri

STATES = ("pending", "consumed", "quarantined", "superseded", "missing")
APPENDABLE = ("jsonl", "csv")  # line formats whose appended bytes parse on their own


class FileCheck(BaseModel):
    """A file's validation under one set of rules (`fp`: `data.validation_fingerprint`)."""

    fp: str
    rows: int = 0  # valid rows
    read: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    reason: str | None = None  # set: the file as a whole is unusable
    # Labels its rows name that the stream does not know yet (continual.new_labels: grow): the
    # cycle adds them to the stream's label set, which judges the file again.
    new_labels: list[str] = Field(default_factory=list)


class Appended(BaseModel):
    sha256: str  # the consumed content this file's bytes begin with
    offset: int


class FileRecord(BaseModel):
    """One distinct content that landed, and what became of it (`ledger/<sha256>.json`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # fields of newer versions survive a rewrite

    sha256: str
    path: str
    size: int | None = None
    mtime_ns: int | None = None
    first_seen: float
    state: Literal["pending", "consumed", "quarantined", "superseded", "missing"]
    reason: str | None = None
    format: str | None = None
    object: str | None = None  # the stored bytes (None: records of the previous ledger, unknown file types)
    copies: list[str] = Field(default_factory=list)
    check: FileCheck | None = None
    consumed_by: str | None = None
    consumed_at: float | None = None
    quarantined_at: float | None = None
    rewrites: str | None = None
    appends: Appended | None = None
    superseded_by: str | None = None
    requeued_from: dict | None = None

    @property
    def rows(self) -> int:
        return self.check.rows if self.check else 0

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class Ingested:
    """What reading one file gave a Ray task (`ingest_file`, `check_record`, batched)."""

    status: Literal["ok", "missing", "changing", "unreadable"]
    reason: str = ""
    sha256: str = ""
    size: int = 0
    mtime_ns: int | None = None
    format: str | None = None
    object: str | None = None
    appends: Appended | None = None
    check: FileCheck | None = None


class IndexEntry(BaseModel):
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str


@dataclass
class ScanReport:
    new: list[FileRecord] = field(default_factory=list)  # records created by this scan
    rewritten: list[FileRecord] = field(default_factory=list)  # of which: new bytes at a known path
    appended: list[FileRecord] = field(default_factory=list)  # of which: bytes appended to consumed content
    superseded: list[FileRecord] = field(default_factory=list)  # pending content replaced at its path before training
    copies: list[tuple[str, str]] = field(default_factory=list)  # (path, the path its content first came under)
    vanished: list[str] = field(default_factory=list)  # listed, then gone before it could be read
    deferred: list[tuple[str, str]] = field(default_factory=list)  # (path, why): read again next poll
    unchanged: int = 0
    excluded: int = 0  # files under the storage root, when it lies inside the landing zone

    @property
    def quarantined(self) -> list[FileRecord]:
        return [r for r in self.new if r.state == "quarantined"]

    def lines(self) -> list[str]:
        out = [f"{len(self.new)} new file(s), {self.unchanged} already known"]
        out += [
            f"{r.path}: rewritten with new content (was {r.rewrites[:12]}…): treated as new data"
            for r in self.rewritten
            if r.appends is None
        ]
        out += [f"{r.path}: {r.size - r.appends.offset} bytes appended to consumed content: only the new rows train" for r in self.appended]
        out += [f"{r.path}: its pending content {r.sha256[:12]}… was replaced before training: superseded" for r in self.superseded]
        out += [f"{path}: same content as {first}: not trained on again" for path, first in self.copies]
        out += [f"{path}: vanished before it could be read" for path in self.vanished]
        out += [f"{path}: {why}; read again next poll" for path, why in self.deferred]
        if self.excluded:
            out.append(f"{self.excluded} file(s) under the storage root (inside the landing zone) left out")
        return out


class Ledger:
    def __init__(self, storage: Storage, stream: str):
        self.storage, self.stream = storage, stream
        self.base = f"streams/{stream}"
        self.dir = f"{self.base}/ledger"

    # --- paths -----------------------------------------------------------------------------
    def object_rel(self, sha256: str) -> str:
        return f"{self.base}/objects/{sha256[:2]}/{sha256}"

    def rows_rel(self, sha256: str, fingerprint: str) -> str:
        return f"{self.base}/rows/{sha256}-{fingerprint}.parquet"

    # --- reading ---------------------------------------------------------------------------
    def records(self) -> list[FileRecord]:
        """Every record (reads the whole history: for listings and reports, not for polls)."""
        names = [n for n in self.storage.listdir(self.dir) if n.endswith(".json") and n != "index.json"]
        return sorted(
            (FileRecord.model_validate_json(self.storage.read_bytes(f"{self.dir}/{n}")) for n in names),
            key=lambda r: (r.first_seen, r.path),
        )

    def record(self, sha256: str) -> FileRecord | None:
        read = self.storage.read_versioned(f"{self.dir}/{sha256}.json")
        return FileRecord.model_validate_json(read[0]) if read else None

    def pending(self) -> list[FileRecord]:
        """Pending records, oldest first: one listing of the open markers, one read each."""
        out = []
        for sha in self.storage.listdir(f"{self.dir}/open"):
            record = self.record(sha)
            if record is None or record.state != "pending":
                self.storage.delete(f"{self.dir}/open/{sha}")  # left by a crash between two writes
                continue
            out.append(record)
        return sorted(out, key=lambda r: (r.first_seen, r.path))

    def counts(self, records: list[FileRecord] | None = None) -> dict[str, int]:
        """Files by state (of `records`, when the caller has read them already)."""
        out = dict.fromkeys(STATES, 0)
        for r in self.records() if records is None else records:
            out[r.state] += 1
        return out

    # --- writing ---------------------------------------------------------------------------
    def _create(self, record: FileRecord) -> FileRecord:
        """Record new content; if another writer recorded it first, theirs stands."""
        if record.state == "pending":  # the marker first: a pending record is never unlisted
            self.storage.write_bytes(f"{self.dir}/open/{record.sha256}", b"")
        if self.storage.create_exclusive(f"{self.dir}/{record.sha256}.json", _dump(record)):
            return record
        return self.record(record.sha256)

    def _update(self, sha256: str, change) -> FileRecord:
        """Apply `change(record)` by compare-and-swap, re-reading when another writer got in
        between; keeps the open marker in step with the state."""
        rel = f"{self.dir}/{sha256}.json"
        for _ in range(100):
            read = self.storage.read_versioned(rel)
            if read is None:
                raise KeyError(f"no ledger record for content {sha256} in stream '{self.stream}'")
            record = FileRecord.model_validate_json(read[0])
            was = record.state
            if change(record) is False:  # nothing to change
                return record
            if record.state == "pending" and was != "pending":
                self.storage.write_bytes(f"{self.dir}/open/{sha256}", b"")
            if self.storage.replace_if(rel, _dump(record), read[1]):
                if was == "pending" and record.state != "pending":
                    self.storage.delete(f"{self.dir}/open/{sha256}")
                return record
        raise LifelongError(f"ledger record {sha256} of stream '{self.stream}': gave up after 100 concurrent updates")

    def _set(self, sha256: str, **fields) -> FileRecord:
        def change(r: FileRecord):
            for k, v in fields.items():
                setattr(r, k, v)

        return self._update(sha256, change)

    def quarantine(self, sha256: str, reason: str) -> FileRecord:
        return self._set(sha256, state="quarantined", reason=reason, quarantined_at=time.time())

    def consume(self, hashes: list[str], version: str) -> None:
        """Mark the files consumed by `version` (call after it is registered); idempotent."""

        def mark(r: FileRecord):
            if r.state != "pending":
                return False
            r.state, r.consumed_by, r.consumed_at, r.reason = "consumed", version, time.time(), None

        for digest in hashes:
            self._update(digest, mark)

    def requeue(self, hashes: list[str] | None = None) -> list[FileRecord]:
        """Quarantined (or missing) records back to pending, to be checked again under the
        current config; `None`: all of them. Returns the records changed."""
        if hashes is None:
            hashes = [r.sha256 for r in self.records() if r.state in ("quarantined", "missing")]
        changed = []
        for digest in hashes:
            record = self.record(digest)
            if record is None:
                raise LifelongError(
                    f"no file with content {digest} in the ledger of stream '{self.stream}' "
                    "(see `lifelong continual ledger CONFIG` for the hashes)"
                )
            if record.state not in ("quarantined", "missing"):
                raise LifelongError(f"{record.path} ({digest[:12]}…) is {record.state}: only quarantined or missing files are requeued")

            def back(r: FileRecord):
                r.requeued_from = {"state": r.state, "reason": r.reason}
                r.state, r.reason, r.check = "pending", None, None

            changed.append(self._update(digest, back))
        return changed

    # --- the index: which content each path held when last seen ----------------------------------
    def _index(self) -> dict[str, IndexEntry]:
        rel = f"{self.dir}/index.json"
        if self.storage.exists(rel):
            return {p: IndexEntry.model_validate(e) for p, e in self.storage.read_json(rel)["paths"].items()}
        # First poll of this stream (or one written before the index existed): built once from the records.
        paths = {}
        for r in self.records():
            for p in [r.path, *r.copies]:
                own = p == r.path
                paths[p] = IndexEntry(size=r.size if own else None, mtime_ns=r.mtime_ns if own else None, sha256=r.sha256)
        return paths

    def _write_index(self, paths: dict[str, IndexEntry]) -> None:
        self.storage.write_json(f"{self.dir}/index.json", {"paths": {p: e.model_dump() for p, e in paths.items()}})

    # --- scanning ----------------------------------------------------------------------------
    def scan(self, landing: str, cfg: DataConfig) -> ScanReport:
        """Record the landing zone's new and changed files: each is copied into the store (hashed
        on the way), parsed and validated once, in Ray tasks."""
        if not is_uri(landing):  # absolute: Ray tasks read these paths from other working directories
            landing = str(Path(landing).expanduser().resolve())
        fs, base = filesystem_for(landing)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise LifelongError(f"continual.landing '{landing}' is not a directory (any more): new data files are dropped there")
        exclude = (self.storage.base,) if type(fs) is type(self.storage.fs) else ()
        everything = list_files(fs, base)
        listed = list_files(fs, base, exclude)
        report = ScanReport(excluded=len(everything) - len(listed))
        index = self._index()
        now_at = {display_uri(fs, i.path): i for i in listed}
        todo = []
        for uri, info in now_at.items():
            seen = index.get(uri)
            if seen and seen.size == info.size and seen.mtime_ns == info.mtime_ns:
                report.unchanged += 1
                continue
            previous = self.record(seen.sha256) if seen else None
            # Bytes appended to consumed content: hash the old length on the way to recognise it.
            appendable = (
                previous is not None
                and previous.state == "consumed"
                and previous.format in APPENDABLE
                and previous.path == uri
                and previous.size is not None
                and info.size > previous.size
            )
            todo.append((uri, info, previous, appendable))
        fingerprint = validation_fingerprint(cfg)
        files = [(info.path, (previous.sha256, previous.size) if appendable else None) for _, info, previous, appendable in todo]
        results = in_batches(
            [info.size or 0 for _, info, _, _ in todo],
            lambda picked: ingest_files.remote(fs, [files[i] for i in picked], self.storage, self.stream, cfg, fingerprint),
            f"reading the new files of {landing}",
        )
        changed = False
        for (uri, info, previous, _), got in zip(todo, results):
            if got.status == "missing":
                report.vanished.append(uri)
                continue
            if got.status != "ok":
                report.deferred.append((uri, got.reason))
                continue
            changed = True
            digest = got.sha256
            index[uri] = IndexEntry(size=got.size, mtime_ns=got.mtime_ns, sha256=digest)
            known = self.record(digest)
            if known is not None:
                if uri != known.path and uri not in known.copies:

                    def add_copy(r: FileRecord, uri=uri):
                        if uri in r.copies:
                            return False
                        r.copies = [*r.copies, uri]

                    known = self._update(digest, add_copy)
                    report.copies.append((uri, known.path))
                else:
                    report.unchanged += 1
                if known.state == "superseded":  # the bytes are back in the landing zone
                    self._set(digest, state="pending", reason=None, superseded_by=None)
            else:
                record = FileRecord(
                    sha256=digest,
                    path=uri,
                    size=got.size,
                    mtime_ns=got.mtime_ns,
                    format=got.format,
                    object=got.object,
                    first_seen=time.time(),
                    state="pending",
                    check=got.check,
                )
                if previous is not None and previous.sha256 != digest:
                    record.rewrites = previous.sha256
                    record.appends = got.appends
                if got.check.reason:
                    record.state, record.reason, record.quarantined_at = "quarantined", got.check.reason, time.time()
                if self._create(record) is record:
                    report.new.append(record)
                    if record.rewrites:
                        report.rewritten.append(record)
                    if record.appends:
                        report.appended.append(record)
                else:
                    report.unchanged += 1
            if previous is not None and previous.sha256 != digest and previous.state == "pending":
                holders = [p for p, e in index.items() if e.sha256 == previous.sha256 and p in now_at]
                if not holders:  # replaced before it was trained: those bytes are no longer data
                    report.superseded.append(
                        self._set(
                            previous.sha256,
                            state="superseded",
                            superseded_by=digest,
                            reason=f"replaced at {uri} by new content before it was trained",
                        )
                    )
        if changed:
            self._write_index(index)
        return report

    def check_pending(self, cfg: DataConfig, landing: str) -> list[FileRecord]:
        """Make every pending record's check current: content captured (older records kept only a
        path) and validated under the config's rules (a changed config judges them again).
        Quarantines what has no valid row and marks missing what can no longer be found.
        Returns the records quarantined or marked missing here."""
        fingerprint = validation_fingerprint(cfg)
        stale = [r for r in self.pending() if r.check is None or r.check.fp != fingerprint]
        fs, _ = filesystem_for(landing)  # where a record without a stored copy is looked for
        results = in_batches(
            [r.size or 0 for r in stale],
            lambda picked: check_records.remote(self.storage, self.stream, fs, [stale[i] for i in picked], cfg, fingerprint),
            "checking pending files",
        )
        out = []
        for record, got in zip(stale, results):
            if got.status == "missing":
                out.append(
                    self._set(
                        record.sha256,
                        state="missing",
                        reason="its content was never captured and the landing file is gone or holds other bytes now",
                    )
                )
            elif got.status == "ok":
                self._set(record.sha256, check=got.check, object=got.object)
            # else: unreadable right now; stays pending, checked again next poll
        for record in self.pending():
            check = record.check
            if check is None or check.fp != fingerprint:
                continue
            if check.reason:
                out.append(self.quarantine(record.sha256, check.reason))
            elif not check.rows and not check.new_labels:  # (new labels: judged again once the set holds them)
                dropped = ", ".join(f"{k}={v}" for k, v in sorted(check.dropped.items()))
                out.append(self.quarantine(record.sha256, f"no valid rows ({dropped or 'none read'})"))
        return out


# --- Ray tasks: a batch of files each, in parallel, off the driver ---------------------------------
# A task per file started a worker process per quarter CPU (Ray's warning: 24 started on a node of
# 4 CPUs) and paid a task's round trip per small image: the scan of a window of 180 digit images
# took 11-52 s of a cycle whose training took 2-4. A batch closes at BATCH_FILES files or
# BATCH_BYTES bytes, smaller when that leaves the cluster's CPUs without one.
BATCH_FILES, BATCH_BYTES = 64, 64 << 20


def in_batches(sizes: list[int], submit, what: str) -> list:
    """`submit(indices)` for consecutive batches of the items of these `sizes`; their results,
    one per item, in order (runtime.gather says so while they are outstanding)."""
    if not sizes:
        return []
    per = max(1, min(BATCH_FILES, -(-len(sizes) // max(int(ray.cluster_resources().get("CPU", 1)), 1))))
    batches, batch, total = [], [], 0
    for i, size in enumerate(sizes):
        if batch and (len(batch) >= per or total + size > BATCH_BYTES):
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += size
    batches.append(batch)
    return [got for part in gather([submit(b) for b in batches], what) for got in part]


@ray.remote(num_cpus=0.25, scheduling_strategy="SPREAD")
def ingest_files(
    fs: pafs.FileSystem, files: list[tuple[str, tuple[str, int] | None]], storage: Storage, stream: str, cfg: DataConfig, fingerprint: str
) -> list[Ingested]:
    return [ingest_file(fs, path, storage, stream, cfg, fingerprint, previous) for path, previous in files]


@ray.remote(num_cpus=0.25, scheduling_strategy="SPREAD")
def check_records(
    storage: Storage, stream: str, landing_fs: pafs.FileSystem, records: list[FileRecord], cfg: DataConfig, fingerprint: str
) -> list[Ingested]:
    return [check_record(storage, stream, landing_fs, r, cfg, fingerprint) for r in records]


def ingest_file(
    fs: pafs.FileSystem, path: str, storage: Storage, stream: str, cfg: DataConfig, fingerprint: str, previous: tuple[str, int] | None
) -> Ingested:
    """Copy one landing file into the store (hashed on the way), parse and validate that copy."""
    fmt = detect_format(path, cfg.format)
    try:
        fetched, prefix = fetch(fs, path, prefix_size=previous[1] if previous else None)
    except SourceGone:
        return Ingested("missing")
    except SourceUnstable:
        return Ingested("changing", "still being written (it changed while it was read)")
    except OSError as e:
        return Ingested("unreadable", f"could not be read ({first_line(e)})")
    try:
        ledger = Ledger(storage, stream)
        obj = ledger.object_rel(fetched.sha256) if fmt else None
        if obj:  # a file of no known data type is recorded and quarantined, not copied
            _store(storage, obj, fetched)
        appends = None
        if previous and prefix == previous[0] and fmt in APPENDABLE and _ends_line(fetched, previous[1]):
            appends = Appended(sha256=previous[0], offset=previous[1])
        return Ingested(
            "ok",
            sha256=fetched.sha256,
            size=fetched.size,
            mtime_ns=fetched.mtime_ns,
            format=fmt,
            object=obj,
            appends=appends,
            check=_check(ledger, fetched, fmt, cfg, fingerprint, path, appends, image_reader(fs, path, cfg.image_root)),
        )
    finally:
        fetched.close()


def check_record(
    storage: Storage, stream: str, landing_fs: pafs.FileSystem, record: FileRecord, cfg: DataConfig, fingerprint: str
) -> Ingested:
    """Validate a recorded content again (from its stored copy; an older record without one is
    captured from its landing path if the bytes there are still the recorded ones)."""
    ledger = Ledger(storage, stream)
    obj = ledger.object_rel(record.sha256)
    try:
        if storage.exists(obj):
            fetched, _ = fetch(storage.fs, storage.path(obj))
        else:
            fetched, _ = fetch(landing_fs, record.path.split("://", 1)[-1])
            if fetched.sha256 != record.sha256:
                fetched.close()
                return Ingested("missing")
            _store(storage, obj, fetched)
    except SourceGone:
        return Ingested("missing")
    except (SourceUnstable, OSError) as e:
        return Ingested("unreadable", first_line(e))
    try:
        fmt = record.format or detect_format(record.path, cfg.format)
        images = image_reader(landing_fs, record.path.split("://", 1)[-1], cfg.image_root)  # a table's image paths: where it landed
        return Ingested("ok", object=obj, check=_check(ledger, fetched, fmt, cfg, fingerprint, record.path, record.appends, images))
    finally:
        fetched.close()


def _check(
    ledger: Ledger,
    fetched: Fetched,
    fmt: str | None,
    cfg: DataConfig,
    fingerprint: str,
    name: str,
    appends: Appended | None,
    images: ImageReader | None = None,
) -> FileCheck:
    """Parse and validate stored bytes (only what was appended, for an append); their valid rows
    go to rows/<sha>-<fp>.parquet, where cycles read them (a table's image paths: the images'
    bytes as read now, by `images`)."""
    source = fetched.tail(appends.offset, keep_first_line=(fmt == "csv")) if appends else fetched
    parsed = parse_file(source, fmt, cfg, name, images)
    if parsed.reason:
        return FileCheck(fp=fingerprint, read=parsed.read, dropped=parsed.dropped, reason=parsed.reason)
    rel = ledger.rows_rel(fetched.sha256, fingerprint)
    if not ledger.storage.exists(rel):
        ledger.storage.write_table(rel, parsed.rows)
    return FileCheck(
        fp=fingerprint,
        rows=parsed.rows.num_rows,
        read=parsed.read,
        dropped=parsed.dropped,
        splits=split_counts(parsed.rows),
        new_labels=parsed.new_labels,
    )


def _store(storage: Storage, rel: str, fetched: Fetched) -> None:
    """The landed bytes into the store, once (content-addressed: a second writer changes nothing)."""
    if storage.exists(rel):
        return
    if fetched.data is not None:
        storage.create_exclusive(rel, fetched.data)
    else:
        storage.create_exclusive_file(rel, fetched.local)


def _ends_line(fetched: Fetched, offset: int) -> bool:
    with fetched.open() as f:
        f.seek(offset - 1)
        return f.read(1) == b"\n"


def _dump(record: FileRecord) -> bytes:
    return json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True).encode()
