"""One storage root on any pyarrow filesystem: a local directory, s3://, gs://, a shared mount.

Writers never expose half-written files: on a local disk a file is written beside its target
and renamed over it; on an object store a PUT is atomic per object. Multi-file objects
(registry versions) are made visible by writing their manifest last (see registry.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from lifelong.errors import LifelongError


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pafs.ArrowInvalid, OSError, ValueError) as e:
            raise LifelongError(f"cannot open storage URI '{path}': {e}") from None
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


class Storage:
    """Files under one root. Paths given to methods are relative, '/'-separated."""

    def __init__(self, root: str):
        self.uri = root
        self.fs, self.base = filesystem_for(root)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    @property
    def root_uri(self) -> str:
        """The root as Ray Train/Tune accept it (an absolute path or a URI)."""
        return self.base if self.is_local else self.uri.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def uri_of(self, *parts: str) -> str:
        return posixpath.join(self.root_uri, *parts)

    # --- reading ---------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under `rel` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    # --- writing ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` atomically: readers see the old content or the new, never a part."""
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=posixpath.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist yet; False when it already did.

        Local disks get this atomically from O_EXCL via a hard link. Object stores get a
        check-then-put here; races between writers on object stores are closed by the
        caller's lock (see `lock`).
        """
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=posixpath.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.exists(rel):
            return False
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        return True

    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        local_dir = Path(local_dir)
        for src in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            dest = self.path(rel, src.relative_to(local_dir).as_posix())
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(local_dir), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """Serialise writers of one resource (version numbering, alias moves).

        On a local or shared POSIX mount this is an flock on `<rel>.lock`. Object stores have
        no locks; there the immutable-object + pointer-written-last layout keeps readers safe.
        """
        if not self.is_local:
            yield
            return
        path = Path(self.path(rel + ".lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def local_cache_dir(*parts: str) -> Path:
    """A per-user cache for immutable objects fetched from remote storage."""
    base = Path(os.environ.get("LIFELONG_CACHE", Path.home() / ".cache" / "lifelong"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
