"""The landing zone's ledger: every file that ever arrived, by content, and what became of it.

    <root>/streams/<stream>/ledger/<sha256>.json     one record per distinct content

A record: the content's hash, the path it arrived under (and any other paths the same bytes
later arrived under), size, rows (once read), first seen, state (pending | consumed |
quarantined), the reason (quarantined) or the version that consumed it, and, when the file
replaced earlier content at the same path, the hash it rewrote.

- Identity is the content: an identical copy under another name joins the record as a copy
  and is not trained on twice; a path that comes back with new bytes is new data (its record
  says which content it rewrote).
- A file is marked consumed only after the version trained on it is registered, and that
  version's card lists the hashes it consumed: `reconcile` marks them consumed if the process
  died between the two, so a crash anywhere leaves a file pending or consumed, never lost or
  counted twice.
- Each record is its own object, created only-if-absent and updated by compare-and-swap
  (`Storage.replace_if`: flock on local disks, If-Match on S3), so racing writers never lose
  an update; one cycle runs at a time per stream (`Storage.lock`, a lease on S3).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from lifelong.errors import LifelongError
from lifelong.storage import filesystem_for, is_uri

SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


@dataclass
class ScanReport:
    new: list[dict] = field(default_factory=list)          # records created by this scan
    rewritten: list[dict] = field(default_factory=list)    # of which: new bytes at a known path
    copies: list[tuple[str, str]] = field(default_factory=list)  # (path, the path its content first came under)
    unchanged: int = 0

    def lines(self) -> list[str]:
        out = [f"{len(self.new)} new file(s), {self.unchanged} already known"]
        out += [f"{r['path']}: rewritten with new content (was {r['rewrites'][:12]}…): treated as new data" for r in self.rewritten]
        out += [f"{path}: same content as {first}: not trained on again" for path, first in self.copies]
        return out


class Ledger:
    def __init__(self, storage, stream: str):
        self.storage, self.stream = storage, stream
        self.dir = f"streams/{stream}/ledger"

    # --- reading ---------------------------------------------------------------------------
    def records(self) -> list[dict]:
        names = [n for n in self.storage.listdir(self.dir) if n.endswith(".json")]
        return sorted((self.storage.read_json(f"{self.dir}/{n}") for n in names), key=lambda r: (r["first_seen"], r["path"]))

    def record(self, sha256: str) -> dict | None:
        rel = f"{self.dir}/{sha256}.json"
        return self.storage.read_json(rel) if self.storage.exists(rel) else None

    def pending(self) -> list[dict]:
        return [r for r in self.records() if r["state"] == "pending"]

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "consumed": 0, "quarantined": 0}
        for r in self.records():
            out[r["state"]] += 1
        return out

    # --- writing ---------------------------------------------------------------------------
    def _create(self, record: dict) -> dict:
        """Record new content; if another writer recorded it first, theirs stands."""
        rel = f"{self.dir}/{record['sha256']}.json"
        if self.storage.create_exclusive(rel, _dump(record)):
            return record
        return self.storage.read_json(rel)

    def _update(self, sha256: str, change) -> dict:
        """Apply `change(record)` by compare-and-swap, re-reading when another writer got in
        between: no writer's update is lost (local disks, shared mounts and S3 alike)."""
        rel = f"{self.dir}/{sha256}.json"
        for _ in range(100):
            read = self.storage.read_versioned(rel)
            if read is None:
                raise KeyError(f"no ledger record for content {sha256} in stream '{self.stream}'")
            record = json.loads(read[0])
            if change(record) is False:  # nothing to change
                return record
            if self.storage.replace_if(rel, _dump(record), read[1]):
                return record
        raise LifelongError(f"ledger record {sha256} of stream '{self.stream}': gave up after 100 concurrent updates")

    def scan(self, landing: str) -> ScanReport:
        """Record the landing zone's files not seen before (by content) as pending."""
        if not is_uri(landing):  # absolute: Ray tasks read these paths from other working directories
            landing = str(Path(landing).expanduser().resolve())
        fs, base = filesystem_for(landing)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted((i for i in infos if i.type == pafs.FileType.File and i.path.endswith(SUFFIXES)
                        and not posixpath.basename(i.path).startswith((".", "_"))), key=lambda i: i.path)
        known = self.records()
        by_hash = {r["sha256"]: r for r in known}
        # The last content seen at each path: a different hash there is a rewrite.
        by_path = {}
        for r in known:
            for p in [r["path"], *r.get("copies", [])]:
                by_path[p] = r
        # Unchanged files are not re-hashed: same path, size and modification time as recorded.
        report = ScanReport()
        for info in files:
            uri = landing.rstrip("/") + "/" + posixpath.relpath(info.path, base) if "://" in landing else info.path
            seen = by_path.get(uri)
            if seen and seen.get("size") == info.size and seen.get("mtime_ns") == info.mtime_ns and seen["path"] == uri:
                report.unchanged += 1
                continue
            digest = _sha256(fs, info.path)
            if digest in by_hash:
                record = by_hash[digest]
                if uri != record["path"] and uri not in record.get("copies", []):
                    def add_copy(r, uri=uri):
                        if uri in r.setdefault("copies", []):
                            return False
                        r["copies"].append(uri)
                    by_hash[digest] = record = self._update(digest, add_copy)
                    report.copies.append((uri, record["path"]))
                else:
                    report.unchanged += 1
                continue
            record = {"sha256": digest, "path": uri, "size": info.size, "mtime_ns": info.mtime_ns, "rows": None,
                      "first_seen": time.time(), "state": "pending", "reason": None, "consumed_by": None}
            if seen and seen["sha256"] != digest:
                record["rewrites"] = seen["sha256"]
                report.rewritten.append(record)
            if self._create(record) is not record:  # another scanner recorded this content first
                report.unchanged += 1
                continue
            by_hash[digest] = by_path[uri] = record
            report.new.append(record)
        return report

    def set_rows(self, sha256: str, rows: int) -> None:
        self._update(sha256, lambda r: r.update(rows=rows))

    def quarantine(self, sha256: str, reason: str) -> None:
        self._update(sha256, lambda r: r.update(state="quarantined", reason=reason))

    def consume(self, hashes: list[str], version: str) -> None:
        """Mark the files consumed by `version` (call after it is registered)."""
        def mark(r):
            if r["state"] != "pending":
                return False
            r.update(state="consumed", consumed_by=version, consumed_at=time.time())
        for digest in hashes:
            self._update(digest, mark)

    def reconcile(self, registry, model: str) -> list[str]:
        """Finish what a crash between registering a version and marking its files left undone:
        pending files that a registered version's card says it consumed become consumed."""
        fixed = []
        pending = {r["sha256"] for r in self.pending()}
        if not pending:
            return fixed
        for version in registry.versions(model):
            card = registry.card(model, version)
            stream = card.get("stream") or {}
            if stream.get("name") != self.stream:
                continue
            hit = [h for h in stream.get("files", []) if h in pending]
            if hit:
                self.consume(hit, f"{model}:{version}")
                fixed += hit
                pending -= set(hit)
        return fixed


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _dump(record: dict) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True, default=str).encode()
