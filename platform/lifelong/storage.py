"""One storage root on any pyarrow filesystem: a local directory, s3://, gs://, a shared mount.

Writers never expose half-written files: on a local disk a file is written beside its target
and renamed over it; on an object store a PUT is atomic per object. Multi-file objects
(registry versions) are made visible by writing their manifest last (see registry.py).

Races between writers are closed by two primitives that work on both kinds of store:
`create_exclusive` (write only if absent) and `replace_if` (compare-and-swap on a token read
with `read_versioned`). A local disk or shared POSIX mount gets them from O_EXCL links and
flock; S3 gets them from conditional PUTs (If-None-Match: * / If-Match: ETag, through boto3,
since pyarrow has none). Other object stores (gs://, ...) fall back to check-then-put, which
is safe with one writer at a time only.

S3 endpoint and region come from the root URI's query (`s3://bucket/prefix?endpoint_override=
host:port&scheme=http&region=...`) or the usual AWS variables (AWS_ENDPOINT_URL, AWS_REGION);
credentials only from the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an
instance or pod role), never from configs, and they are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lifelong.console import say
from lifelong.errors import LifelongError


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        parsed = urlparse(path)
        if "@" in parsed.netloc:  # s3://KEY:SECRET@bucket/...: never accepted, never echoed
            shown = f"{parsed.scheme}://{parsed.netloc.rpartition('@')[2]}{parsed.path}"
            raise LifelongError(
                f"the URI {shown} carries credentials before its bucket ('…@'): they are refused so that they never reach "
                "configs, logs or listings; give them through the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "~/.aws, an instance or pod role)"
            )
        if parsed.scheme in ("s3", "s3a", "gs", "gcs") and not parsed.netloc:
            raise LifelongError(f"cannot open the URI '{path}': it names no bucket (write {parsed.scheme}://BUCKET/PREFIX)")
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise LifelongError(
                f"cannot open the URI '{path}': {str(e).splitlines()[0]} "
                "(use a local path, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, or another filesystem pyarrow knows)"
            ) from None
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


_CHUNK = 1 << 20


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _local_put(target: str, src: BinaryIO, *, exclusive: bool) -> bool:
    """Write a local file beside `target`, then make it appear whole: rename over `target`, or,
    when `exclusive`, hard-link it (fails if `target` exists: O_EXCL semantics, also on NFS)."""
    fd, tmp = tempfile.mkstemp(dir=posixpath.dirname(target), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f, _CHUNK)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; the umask decides, as for any other file (a shared mount's users read the registry).
        os.chmod(tmp, 0o666 & ~_umask())
        if exclusive:
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        os.replace(tmp, target)
        tmp = None
        return True
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


WRITE_ID = "lifelong-write"  # S3 user metadata: which PUT wrote this object


class _S3Conditional:
    """Conditional PUT / GET-with-ETag / DELETE on S3 through boto3 (pyarrow has no conditions)."""

    def __init__(self, uri: str):
        import boto3
        from botocore.config import Config

        query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=query.get("region") or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    @classmethod
    def _refused(cls, e) -> bool:
        # 412: the condition failed; 409: a concurrent conditional write to the same key won.
        return cls._status(e) in (409, 412)

    def get(self, path: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        bucket, key = self._split(path)
        try:
            r = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def put(self, path: str, data: bytes | BinaryIO, *, if_match: str | None = None) -> str | None:
        """PUT `data` (bytes or a seekable stream); only if absent when `if_match` is None, else
        only if the ETag still matches. Returns the new ETag, or None when the condition failed.

        botocore retries a PUT whose response was lost; the retry is then refused by the first
        attempt's own write. Each PUT carries a write id in its metadata, so a refusal is checked
        against the object there: our own write is a success, anything else a real conflict."""
        from botocore.exceptions import ClientError

        bucket, key = self._split(path)
        condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        write_id = uuid.uuid4().hex
        try:
            r = self.client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={WRITE_ID: write_id}, **condition)
        except ClientError as e:
            if self._refused(e) or (if_match is not None and self._status(e) == 404):
                return self._written_by(bucket, key, write_id)
            raise
        return r["ETag"]

    def _written_by(self, bucket: str, key: str, write_id: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if self._status(e) == 404:
                return None
            raise
        return head["ETag"] if head.get("Metadata", {}).get(WRITE_ID) == write_id else None

    @staticmethod
    def _status(e) -> int | None:
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")

    def delete(self, path: str, *, if_match: str | None = None) -> bool:
        """DELETE; with `if_match`, only while the object is still that version (False otherwise)."""
        from botocore.exceptions import ClientError

        bucket, key = self._split(path)
        try:
            self.client.delete_object(Bucket=bucket, Key=key, **({"IfMatch": if_match} if if_match else {}))
        except ClientError as e:
            if if_match and (self._refused(e) or self._status(e) == 404):
                return False
            raise
        return True


class Storage:
    """Files under one root. Paths given to methods are relative, '/'-separated."""

    def __init__(self, root: str):
        self.uri = root
        self.fs, self.base = filesystem_for(root)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._s3 = _S3Conditional(root) if urlparse(root).scheme in ("s3", "s3a") else None
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    def __getstate__(self):  # Ray tasks get the root and rebuild clients where they run
        return {"uri": self.uri}

    def __setstate__(self, state):
        self.__init__(state["uri"])

    @property
    def root_uri(self) -> str:
        """The root as given (with its query) for a URI, the absolute path for a local root."""
        return self.base if self.is_local else self.uri.rstrip("/")

    @property
    def conditional_writes(self) -> bool:
        """True where concurrent writers are safe: local disks, shared mounts, S3."""
        return self.is_local or self._s3 is not None

    def path(self, *parts: str) -> str:
        """A path inside `self.fs` (for pyarrow, Ray Data and Ray Train's `storage_filesystem`)."""
        return posixpath.join(self.base, *parts)

    def location(self, rel: str) -> str:
        """`rel` as a root of its own, valid on any node: a local path, or the URI with its query."""
        if self.is_local:
            return self.path(rel)
        parsed = urlparse(self.uri)
        return parsed._replace(path=posixpath.join(parsed.path or "/", rel)).geturl()

    def uri_of(self, *parts: str) -> str:
        """Where `parts` is, for messages: a local path, or scheme://bucket/key (no query)."""
        return self.path(*parts) if self.is_local else f"{urlparse(self.uri).scheme}://{self.path(*parts)}"

    # --- reading ---------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def open_input(self, rel: str):
        """A stream over `rel` (for copies that should not hold a large file whole)."""
        return self.fs.open_input_stream(self.path(rel))

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(content, token) for `replace_if`, or None when `rel` does not exist."""
        if self._s3 is not None:
            return self._s3.get(self.path(rel))
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty when it does not exist)."""
        if self.is_local:
            # Not pyarrow's selector: it lists, and on ENOENT asks whether the directory exists,
            # so one created in between (a concurrent writer's first file) fails the listing.
            try:
                return sorted(os.listdir(self.path(rel)))
            except FileNotFoundError:
                return []
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    # --- writing ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` atomically: readers see the old content or the new, never a part."""
        self._put(rel, io.BytesIO(data), exclusive=False)

    def write_file(self, rel: str, local_path: str | Path) -> None:
        """`write_bytes` from a local file, streamed (a weight or data file is never held whole)."""
        with open(local_path, "rb") as src:
            self._put(rel, src, exclusive=False)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def write_table(self, rel: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist yet; False when it already did.

        Local disks and shared mounts get this atomically from a hard link (O_EXCL semantics), S3
        from a conditional PUT (If-None-Match: *). Other object stores get a check-then-put, safe
        with one writer at a time (module doc).
        """
        return self._put(rel, io.BytesIO(data), exclusive=True)

    def create_exclusive_file(self, rel: str, local_path: str | Path) -> bool:
        """`create_exclusive` from a local file, streamed."""
        with open(local_path, "rb") as src:
            return self._put(rel, src, exclusive=True)

    def _put(self, rel: str, src: BinaryIO, *, exclusive: bool) -> bool:
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if self.is_local:
            return _local_put(target, src, exclusive=exclusive)
        if exclusive and self._s3 is not None:
            return self._s3.put(target, src) is not None
        if exclusive and self.exists(rel):
            return False
        with self.fs.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return True

    def replace_if(self, rel: str, data: bytes, token: str | None) -> bool:
        """Compare-and-swap: write `rel` only if it is still what `read_versioned` returned
        with `token` (None: only if it still does not exist). False when another writer won."""
        if token is None:
            return self.create_exclusive(rel, data)
        if self._s3 is not None:
            return self._s3.put(self.path(rel), data, if_match=token) is not None
        with self._local_lock(rel) if self.is_local else contextlib.nullcontext():
            current = self.read_versioned(rel)
            if current is None or current[1] != token:
                return False
            self.write_bytes(rel, data)
            return True

    def delete(self, rel: str) -> None:
        if self._s3 is not None:
            self._s3.delete(self.path(rel))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path(rel))

    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        local_dir = Path(local_dir)
        for src in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            dest = self.path(rel, src.relative_to(local_dir).as_posix())
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir_into(self, rel: str, cache: Path) -> None:
        """Replace `cache` with a fresh copy of `rel`, downloaded beside it and renamed in, so that
        no reader sees half a directory; when another process finished first, its copy stands."""
        shutil.rmtree(cache, ignore_errors=True)
        tmp = self.download_dir(rel, tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
        try:
            os.replace(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local_dir), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    @contextlib.contextmanager
    def lock(self, rel: str, *, lease_s: float = 120.0, wait_s: float = 3600.0) -> Iterator[Hold]:
        """Serialise writers of one resource (a stream's cycles, an export); yields a `Hold` whose
        `check()` the holder calls before each write that must be its alone.

        On a local or shared POSIX mount this is an flock on `<rel>.lock` (held until the process
        ends, so `check()` never fails). On S3 it is a lease object `<rel>.lease` (see `_Lease`).
        Waiting longer than `wait_s` raises a LifelongError that names the holder; after 10 s of
        waiting, one line says who holds it.
        """
        if self.is_local:
            with self._local_lock(rel, wait_s) as hold:
                yield hold
            return
        if self._s3 is None:  # no conditional writes here: one writer at a time (module doc)
            yield Hold(f"{socket.gethostname()}:{os.getpid()}")
            return
        with _Lease(self, rel + ".lease", lease_s, wait_s) as lease:
            yield lease

    @contextlib.contextmanager
    def _local_lock(self, rel: str, wait_s: float = 3600.0) -> Iterator[Hold]:
        path = Path(self.path(rel + ".lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = f"{socket.gethostname()}:{os.getpid()}"
        with open(path, "a+") as f:
            waited = _Waiting(self.uri_of(rel + ".lock"), wait_s)
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    f.seek(0)
                    waited.tick(f.read().strip() or "another process")
            try:
                f.seek(0)
                f.truncate()
                f.write(owner)
                f.flush()
                yield Hold(owner)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


class LeaseLost(LifelongError):
    """The holder of a lock can no longer be sure it is the only writer."""


class Hold:
    """What a lock holder has: `fence` names this holding in what it writes; `check()` raises
    LeaseLost once the holding may have passed to another writer."""

    def __init__(self, fence: str):
        self.fence = fence

    def check(self) -> None:
        return None


class _Waiting:
    """Bounded, announced waiting for a lock held by someone else."""

    def __init__(self, what: str, wait_s: float):
        self.what, self.wait_s = what, wait_s
        self.started, self.said, self.delay = time.monotonic(), False, 0.05

    def tick(self, holder: str) -> None:
        waited = time.monotonic() - self.started
        if waited > self.wait_s:
            raise LifelongError(f"{self.what} is still held by {holder} after {waited:.0f} s; is that process still running?")
        if waited > 10 and not self.said:
            say(f"[lifelong] waiting for {self.what}, held by {holder}")
            self.said = True
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 1.0)


class _Lease(Hold):
    """A renewable lease object on S3 (see `Storage.lock`), with no trust in any machine's clock.

    Taken with a conditional create (If-None-Match: *). The holder rewrites it every lease_s/4 with
    If-Match (a failed renewal is retried at the next tick) and counts itself the holder only
    until 3/4 of lease_s after its last successful renewal, measured on its own monotonic clock.
    A waiting writer takes the lease over only once it has seen the same ETag for a whole lease_s
    on its own monotonic clock (its holder stopped renewing), by compare-and-swap on that ETag,
    so one taker wins and does so after the old holder has stopped counting itself the holder.
    Release deletes only the version this holder wrote (If-Match), never a successor's.
    """

    def __init__(self, storage: Storage, rel: str, lease_s: float, wait_s: float):
        super().__init__(f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        self.storage, self.rel, self.lease_s, self.wait_s = storage, rel, lease_s, wait_s
        self.s3, self.key = storage._s3, storage.path(rel)
        self.token: str | None = None
        self.renewed_at = 0.0
        self.lost: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {rel}")

    def _body(self) -> bytes:
        return json.dumps({"owner": self.fence, "renewed_at": time.time()}).encode()  # the time is for people only

    def _try_take(self, seen: dict[str, float]) -> str | None:
        token = self.s3.put(self.key, self._body())
        if token is not None:
            return token
        current = self.s3.get(self.key)
        if current is None:  # released between our two calls
            return None
        first_seen = seen.setdefault(current[1], time.monotonic())
        if time.monotonic() - first_seen >= self.lease_s:  # unchanged for a whole lease: nobody renews it
            return self.s3.put(self.key, self._body(), if_match=current[1])
        self.holder = json.loads(current[0]).get("owner", "another writer") if current[0].startswith(b"{") else "another writer"
        return None

    def __enter__(self):
        seen: dict[str, float] = {}
        waited = _Waiting(self.storage.uri_of(self.rel), self.wait_s)
        while (token := self._try_take(seen)) is None:
            waited.tick(getattr(self, "holder", "another writer"))
        self.token, self.renewed_at = token, time.monotonic()
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                token = self.s3.put(self.key, self._body(), if_match=self.token)
            except Exception as e:  # the store is briefly unreachable: try again at the next tick
                self.last_error = f"{type(e).__name__}: {e}"
                continue
            if token is None:
                self.lost = "another writer took it over"
                return
            self.token, self.renewed_at, self.last_error = token, time.monotonic(), None

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"lost the lease {self.storage.uri_of(self.rel)}: {self.lost}")
        quiet = time.monotonic() - self.renewed_at
        if quiet > self.lease_s * 0.75:
            raise LeaseLost(
                f"the lease {self.storage.uri_of(self.rel)} was last renewed {quiet:.0f} s ago "
                f"({self.last_error or 'no renewal since'}); another writer may hold it now"
            )

    def __exit__(self, *exc):
        self._stop.set()
        self._renewer.join()
        with contextlib.suppress(Exception):  # unreachable now: the lease expires by itself
            self.s3.delete(self.key, if_match=self.token)


def local_cache_dir(*parts: str) -> Path:
    """A per-user cache for immutable objects fetched from remote storage."""
    base = Path(os.environ.get("LIFELONG_CACHE", Path.home() / ".cache" / "lifelong"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
